//! The usage audit (SPEC §2): one row per record the meter processor output,
//! stored as one `meter.usage_audit_batches` row per meter and batch, the records'
//! columns as arrays.
//!
//! The rows are built here, binary, and handed to the INSERT as one array of
//! rows. Sending them as array texts instead cost more than metering:
//! formatting each timestamp, id and amount, then parsing it back.

use bigdecimal::{BigDecimal, ToPrimitive};
use jiff::Timestamp;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use rustc_hash::FxHashMap as HashMap;

use crate::append::{column_positions, Appender};
use crate::convert::to_timestamptz;
use crate::errors::Result;
use crate::sql;

/// Audit rows not written yet, in the order the records were metered; grouped
/// by meter when written. Appending to one log keeps a record's audit row in
/// cache, where appending to its meter's own arrays missed it for each array.
#[derive(Default)]
pub struct AuditRows {
    entries: Vec<Entry>,
    /// Each meter with entries: its position in `heads`.
    meters: HashMap<i64, u32>,
    heads: Vec<MeterHead>,
    /// Rule names, each once; `Entry::rule` is a position in it.
    rule_names: Vec<String>,
}

struct MeterHead {
    meter_id: i64,
    user_id: String,
    period_start: Timestamp,
}

struct Entry {
    /// The meter's position in `AuditRows::heads`.
    meter: u32,
    usage_id: Option<i64>,
    record_id: Option<String>,
    rule: u32,
    amount: Amount,
    at: Timestamp,
}

/// What a record added to its meter. Most amounts are a 64-bit integer of digits
/// and a decimal scale, which PostgreSQL turns into a numeric without text.
enum Amount {
    Scaled { digits: i64, scale: i32 },
    Decimal(Box<str>),
}

/// Scales `int64_div_fast_to_numeric` takes (numeric's own limit is far larger).
const FAST_SCALES: std::ops::RangeInclusive<i64> = -1000..=1000;

impl Amount {
    fn of(value: &BigDecimal) -> Amount {
        let (digits, scale) = value.as_bigint_and_scale();
        match digits.to_i64() {
            Some(digits) if FAST_SCALES.contains(&scale) => Amount::Scaled {
                digits,
                scale: scale as i32,
            },
            _ => Amount::Decimal(value.to_plain_string().into_boxed_str()),
        }
    }

    /// A numeric datum in the current memory context: `digits / 10^scale`, with
    /// `scale` decimal places, as `numeric_in` makes of the amount's plain text.
    fn to_numeric(&self) -> pg_sys::Datum {
        match self {
            Amount::Scaled { digits, scale } => {
                // SAFETY: exact for any int64 and scale; allocates in the current context.
                pg_sys::Datum::from(unsafe { pg_sys::int64_div_fast_to_numeric(*digits, *scale) })
            }
            Amount::Decimal(text) => AnyNumeric::try_from(&**text)
                .expect("a decimal's plain text is a numeric")
                .into_datum()
                .expect("a numeric is a datum"),
        }
    }
}

/// One audited record.
pub struct AuditedRecord<'a> {
    pub meter_id: i64,
    pub user_id: &'a str,
    pub period_start: Timestamp,
    pub usage_id: Option<i64>,
    pub record_id: Option<String>,
    pub rule: &'a str,
    pub amount: &'a BigDecimal,
    pub at: Timestamp,
}

impl AuditRows {
    /// Room for `additional` more rows, taken now rather than by doubling as
    /// they come (each doubling copied the rows so far).
    pub fn reserve(&mut self, additional: usize) {
        self.entries.reserve_exact(additional);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn push(&mut self, record: AuditedRecord) {
        let rule = match self.rule_names.iter().position(|name| name == record.rule) {
            Some(position) => position,
            None => {
                self.rule_names.push(record.rule.to_string());
                self.rule_names.len() - 1
            }
        } as u32;
        let meter = match self.meters.get(&record.meter_id) {
            Some(&at) => at,
            None => {
                let at = self.heads.len() as u32;
                self.meters.insert(record.meter_id, at);
                self.heads.push(MeterHead {
                    meter_id: record.meter_id,
                    user_id: record.user_id.to_string(),
                    period_start: record.period_start,
                });
                at
            }
        };
        self.entries.push(Entry {
            meter,
            usage_id: record.usage_id,
            record_id: record.record_id,
            rule,
            amount: Amount::of(record.amount),
            at: record.at,
        });
    }

    /// Writes the rows, in meter order (the `(meter_id, period_start)` index then
    /// takes its entries in sequence), `ROWS_PER_STATEMENT` meters' rows per
    /// statement, each handed to it as one array of `meter.usage_audit_batches`
    /// rows built here. Each statement's arrays are freed before the next is
    /// built: one array of a whole run's rows, copied once more by the INSERT's
    /// plan and again into its tuplestore, made the backend fault in hundreds of
    /// megabytes of fresh memory per run. The statement has a generic plan: a
    /// custom plan copies its argument into the plan.
    pub fn insert(self, stream_id: i64, session_id: Option<i64>) -> Result<()> {
        if self.entries.is_empty() {
            return Ok(());
        }
        let AuditRows {
            entries,
            heads,
            rule_names,
            ..
        } = self;
        // Each meter's entries, in the order they were metered (a counting sort:
        // moving the entries themselves cost more than writing them).
        let mut starts = vec![0u32; heads.len() + 1];
        for entry in &entries {
            starts[entry.meter as usize + 1] += 1;
        }
        for at in 1..starts.len() {
            starts[at] += starts[at - 1];
        }
        let mut next = starts.clone();
        let mut positions = vec![0u32; entries.len()];
        for (position, entry) in entries.iter().enumerate() {
            let slot = &mut next[entry.meter as usize];
            positions[*slot as usize] = position as u32;
            *slot += 1;
        }
        let mut by_meter: Vec<MeterRows> = heads
            .iter()
            .enumerate()
            .map(|(at, head)| MeterRows {
                head,
                positions: &positions[starts[at] as usize..starts[at + 1] as usize],
            })
            .collect();
        by_meter.sort_unstable_by_key(|rows| rows.head.meter_id);
        let table = sql::one::<pg_sys::Oid>(
            "SELECT 'meter.usage_audit_batches'::pg_catalog.regclass::pg_catalog.oid",
            &[],
        )?
        .expect("the audit table has an oid");
        let columns = ["id", "processed_at"].into_iter().chain(COLUMNS).collect::<Vec<_>>();
        if let Some(appender) = Appender::open(table, &columns) {
            return append(appender, &by_meter, &entries, &rule_names, stream_id, session_id);
        }
        let row_type = sql::one::<pg_sys::Oid>(
            "SELECT 'meter.usage_audit_batches'::pg_catalog.regtype::pg_catalog.oid",
            &[],
        )?
        .expect("the audit table has a row type");
        for batch in by_meter.chunks(ROWS_PER_STATEMENT) {
            sql::in_chunk_context(|| {
                // SAFETY: the row type is the audit table's, looked up just now.
                let rows = unsafe { row_array(batch, &entries, &rule_names, row_type, stream_id, session_id) };
                sql::with_generic_plans(|| {
                    sql::execute(
                        "INSERT INTO meter.usage_audit_batches
                                (session_id, stream_id, meter_id, user_id, period_start, usage_ids, record_ids, rules,
                                 amounts, record_ats)
                         SELECT b.session_id, b.stream_id, b.meter_id, b.user_id, b.period_start, b.usage_ids,
                                b.record_ids, b.rules, b.amounts, b.record_ats
                           FROM pg_catalog.unnest($1) b",
                        &[rows],
                    )
                })
            })?;
        }
        Ok(())
    }
}

/// One meter's entries, by position in the log.
struct MeterRows<'a> {
    head: &'a MeterHead,
    positions: &'a [u32],
}

/// The audit table's columns an audit row sets, in the order `row_values` gives
/// them; `id` and `processed_at` are the table's defaults.
const COLUMNS: [&str; 10] = [
    "session_id",
    "stream_id",
    "meter_id",
    "user_id",
    "period_start",
    "usage_ids",
    "record_ids",
    "rules",
    "amounts",
    "record_ats",
];

/// Meters whose audit rows one INSERT takes.
const ROWS_PER_STATEMENT: usize = 1000;

/// Appends the audit rows as COPY would (see `Appender`), each with its id from the
/// table's identity sequence and the transaction's start as `processed_at`, as
/// the column defaults give an INSERT's rows.
fn append(
    mut appender: Appender,
    by_meter: &[MeterRows],
    entries: &[Entry],
    rule_names: &[String],
    stream_id: i64,
    session_id: Option<i64>,
) -> Result<()> {
    let identity = sql::one::<pg_sys::Oid>(
        "SELECT pg_catalog.pg_get_serial_sequence('meter.usage_audit_batches', 'id')::pg_catalog.regclass::pg_catalog.oid",
        &[],
    )?
    .expect("the audit table's id has a sequence");
    // SAFETY: the transaction's start time, a by-value timestamptz.
    let processed_at = pg_sys::Datum::from(unsafe { pg_sys::GetCurrentTransactionStartTimestamp() });
    let (types, mut buffers) = (ElementTypes::new(), sql::ArrayBuffers::default());
    for rows in by_meter {
        // SAFETY: nextval of the table's own sequence, with its privilege check.
        let id = unsafe {
            pgrx::direct_function_call_as_datum(pg_sys::nextval_oid, &[identity.into_datum()])
                .expect("nextval returns a value")
        };
        let values = appender
            .in_row_memory(|| row_values(rows, entries, rule_names, stream_id, session_id, &types, &mut buffers));
        let mut row = [None; 12];
        row[0] = Some(id);
        row[1] = Some(processed_at);
        row[2..].copy_from_slice(&values);
        appender.push(&row);
    }
    appender.finish();
    Ok(())
}

/// The element types of the audit's arrays other than text.
struct ElementTypes {
    int8: sql::ElementType,
    numeric: sql::ElementType,
    timestamptz: sql::ElementType,
}

impl ElementTypes {
    fn new() -> ElementTypes {
        ElementTypes {
            int8: sql::ElementType::of(pg_sys::INT8OID),
            numeric: sql::ElementType::of(pg_sys::NUMERICOID),
            timestamptz: sql::ElementType::of(pg_sys::TIMESTAMPTZOID),
        }
    }
}

/// An audit row's values for `COLUMNS`, in the current memory context: the
/// meter's, and each record's (its rule by position in `rule_names`).
fn row_values(
    rows: &MeterRows,
    entries: &[Entry],
    rule_names: &[String],
    stream_id: i64,
    session_id: Option<i64>,
    types: &ElementTypes,
    buffers: &mut sql::ArrayBuffers,
) -> [Option<pg_sys::Datum>; 10] {
    let MeterHead {
        meter_id,
        user_id,
        period_start,
    } = rows.head;
    let records = || rows.positions.iter().map(|&at| &entries[at as usize]);
    let ElementTypes {
        int8,
        numeric,
        timestamptz,
    } = types;
    [
        session_id.into_datum(),
        stream_id.into_datum(),
        meter_id.into_datum(),
        user_id.as_str().into_datum(),
        to_timestamptz(*period_start).into_datum(),
        Some(int8.array_of(records().map(|r| r.usage_id.map(pg_sys::Datum::from)), buffers)),
        Some(sql::text_array(records().map(|r| r.record_id.as_deref()))),
        Some(sql::text_array(
            records().map(|r| Some(rule_names[r.rule as usize].as_str())),
        )),
        Some(numeric.array_of(records().map(|r| Some(r.amount.to_numeric())), buffers)),
        Some(timestamptz.array_of(records().map(|r| to_timestamptz(r.at).into_datum()), buffers)),
    ]
}

/// `meters`' audit rows as a `meter.usage_audit_batches[]` datum in the current
/// memory context.
///
/// # Safety
/// `row_type` must be the row type of `meter.usage_audit_batches`.
unsafe fn row_array(
    batch: &[MeterRows],
    entries: &[Entry],
    rule_names: &[String],
    row_type: pg_sys::Oid,
    stream_id: i64,
    session_id: Option<i64>,
) -> DatumWithOid<'static> {
    let descriptor = unsafe { pg_sys::lookup_rowtype_tupdesc(row_type, -1) };
    let at = unsafe { column_positions(descriptor, &COLUMNS) }.expect("the audit columns");
    // Columns not set here (id, processed_at) stay NULL; the INSERT names its own.
    let natts = unsafe { (*descriptor).natts } as usize;
    let mut values = vec![pg_sys::Datum::from(0); natts];
    let mut nulls = vec![true; natts];
    let (types, mut buffers) = (ElementTypes::new(), sql::ArrayBuffers::default());
    let mut elements = Vec::with_capacity(batch.len());
    for rows in batch {
        let fields = row_values(rows, entries, rule_names, stream_id, session_id, &types, &mut buffers);
        for (&column, field) in at.iter().zip(fields) {
            nulls[column] = field.is_none();
            values[column] = field.unwrap_or(pg_sys::Datum::from(0));
        }
        unsafe {
            let tuple = pg_sys::heap_form_tuple(descriptor, values.as_mut_ptr(), nulls.as_mut_ptr());
            elements.push(pg_sys::heap_copy_tuple_as_datum(tuple, descriptor));
            pg_sys::heap_freetuple(tuple);
        }
    }
    unsafe {
        pg_sys::DecrTupleDescRefCount(descriptor);
        let array = pg_sys::construct_array(
            elements.as_mut_ptr(),
            elements.len() as i32,
            row_type,
            -1,
            false,
            pg_sys::TYPALIGN_DOUBLE as std::ffi::c_char,
        );
        DatumWithOid::new(pg_sys::Datum::from(array), pg_sys::get_array_type(row_type))
    }
}
