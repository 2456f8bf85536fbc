//! The meter processor (UE): takes a chunk of usage records through the stream's
//! guiding rules into its meters.
//!
//! The decisions are the pure modules' (`record`, `rules`, `aggregate`); this
//! module does the I/O around them with one set-based statement per step per
//! chunk: load the users' meters (locked), create missing ones when the stream
//! auto-creates, claim record ids for deduplication, apply, write the meters back,
//! and write the audit and rejected rows.
//!
//! In `Mode::Simulate` (preview, DEBUG runs) it reads the same state but writes
//! nothing; what a real run would change is kept in memory across chunks.

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use bigdecimal::BigDecimal;
use jiff::Timestamp;
use pgrx::datum::{DatumWithOid, TimestampWithTimeZone};
use pgrx::prelude::*;
use serde_json::{Map, Value};

use crate::aggregate::{Aggregation, Contribution, GroupRef, GroupState, MeterState, SeenValues, Usage};
use crate::append::Appender;
use crate::audit::{AuditRows, AuditedRecord};
use crate::catalog::{self, MeterTypeSettings, NewMeter, Stream, StreamMode};
use crate::convert::{to_timestamp, to_timestamptz};
use crate::dedupe;
use crate::errors::Result;
use crate::gucs;
use crate::locks;
use crate::record::{extract, Clock, Extracted, Projected, RecordRef, Rejection};
use crate::rules::{Decision, Rule};
use crate::sql;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Change meters, the audit and the rejected records.
    Apply,
    /// Change nothing; report what `Apply` would do.
    Simulate,
}

/// One usage record to process.
#[derive(Debug, Clone)]
pub struct Input {
    /// The inbox row it came from, if any.
    pub usage_id: Option<i64>,
    /// The record, unless `projected` holds the fields processing reads of it.
    pub record: Value,
    /// The fields processing reads, for a record read from its binary form.
    pub projected: Option<Projected>,
    /// The whole record as stored (binary jsonb), when `record` is a projection.
    pub stored: Option<Vec<u8>>,
    /// Why the record could not be read for processing (it is rejected).
    pub unreadable: Option<Rejection>,
}

impl Input {
    pub fn new(record: Value) -> Input {
        Input {
            usage_id: None,
            record,
            projected: None,
            stored: None,
            unreadable: None,
        }
    }

    /// The record as processing reads it.
    pub fn view(&self) -> RecordRef<'_> {
        match &self.projected {
            Some(projected) => RecordRef::Projected(projected),
            None => RecordRef::Whole(&self.record),
        }
    }

    /// A record in its binary form (a jsonb datum's bytes): the fields
    /// `projection` names are read, and the bytes kept for a rejection. A field
    /// read that nests too deep rejects the record instead of failing the run.
    pub fn projected(usage_id: Option<i64>, stored: Vec<u8>, projection: &crate::jsonb::Projection) -> Input {
        let mut input = Input::new(Value::Null);
        input.usage_id = usage_id;
        match crate::jsonb::Container::from_varlena(&stored) {
            Some(root) if root.is_object() => match projection.apply(root) {
                Ok(projected) => input.projected = Some(projected),
                Err(rejection) => input.unreadable = Some(rejection),
            },
            // Rejected as not an object; its kind is all that is read.
            Some(root) => input.record = crate::jsonb::shallow_value(crate::jsonb::Node::Container(root)),
            None => {}
        }
        input.stored = Some(stored);
        input
    }

    /// The record as received, as a jsonb datum in the current memory context
    /// (valid while `self` is): what a rejection keeps. Stored bytes are handed over
    /// as they are, never rebuilt through `serde_json`, so a record nested as deep
    /// as PostgreSQL's parser allowed is kept as intact as a shallow one.
    fn whole_record_datum(&self) -> pg_sys::Datum {
        match &self.stored {
            Some(bytes) => pg_sys::Datum::from(bytes.as_ptr()),
            None => pgrx::JsonB(self.record.clone())
                .into_datum()
                .expect("a jsonb value is a datum"),
        }
    }
}

/// What happened (or, simulated, would happen) to one record. Rule and meter type
/// names are the stream's (`'s`): a run meters millions of records, and copying
/// them per record cost more than counting it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome<'s> {
    Metered {
        rule: &'s str,
        /// `None` for a meter a simulation would create.
        meter_id: Option<i64>,
        meter_type: &'s str,
        user_id: String,
        /// What the record added to the meter (see `MeterState::apply`).
        value: BigDecimal,
        new_meter: bool,
    },
    Duplicate {
        record_id: String,
        rule: &'s str,
        user_id: String,
    },
    Rejected {
        code: &'static str,
        reason: String,
        rule: Option<String>,
    },
}

/// Counts of outcomes, as sessions and `ingest` report them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub metered: i64,
    pub duplicates: i64,
    pub rejected: i64,
}

impl Counts {
    pub fn of(outcomes: &[Outcome<'_>]) -> Counts {
        let mut counts = Counts::default();
        for outcome in outcomes {
            match outcome {
                Outcome::Metered { .. } => counts.metered += 1,
                Outcome::Duplicate { .. } => counts.duplicates += 1,
                Outcome::Rejected { .. } => counts.rejected += 1,
            }
        }
        counts
    }

    pub fn add(&mut self, other: Counts) {
        self.metered += other.metered;
        self.duplicates += other.duplicates;
        self.rejected += other.rejected;
    }

    pub fn total(&self) -> i64 {
        self.metered + self.duplicates + self.rejected
    }
}

type MeterKey = (i64, String); // (meter type id, user id)

/// The meters in memory: slots in a vector, found by user, then by meter type.
/// A record's meter is found without building an owned key, and pass 2 reaches
/// it by the index pass 1 found.
#[derive(Default)]
struct Meters {
    slots: Vec<Slot>,
    /// Each slot's `closed` and aggregation, apart: the rules' pass reads only
    /// these, and a few bytes per meter stay in cache where a slot would not.
    heads: Vec<(bool, Aggregation)>,
    /// Every loaded user, with its meters: a user without meters is loaded too.
    by_user: HashMap<String, UserMeters>,
}

/// A user's meters, `(meter type id, slot)` each: the first few in place (a user
/// has a meter per type its stream's rules name, usually a handful), so finding one
/// reads no memory but the map's entry.
#[derive(Default)]
struct UserMeters {
    first: [(i64, usize); 4],
    len: usize,
    more: Vec<(i64, usize)>,
}

impl UserMeters {
    fn find(&self, type_id: i64) -> Option<usize> {
        let first = &self.first[..self.len.min(self.first.len())];
        first
            .iter()
            .chain(&self.more)
            .find(|(t, _)| *t == type_id)
            .map(|&(_, at)| at)
    }

    fn push(&mut self, type_id: i64, at: usize) {
        match self.first.get_mut(self.len) {
            Some(free) => *free = (type_id, at),
            None => self.more.push((type_id, at)),
        }
        self.len += 1;
    }
}

impl Meters {
    fn find(&self, type_id: i64, user_id: &str) -> Option<usize> {
        self.by_user.get(user_id)?.find(type_id)
    }

    fn is_loaded(&self, user_id: &str) -> bool {
        self.by_user.contains_key(user_id)
    }

    fn mark_loaded(&mut self, user_id: &str) {
        if !self.by_user.contains_key(user_id) {
            self.by_user.insert(user_id.to_string(), UserMeters::default());
        }
    }

    /// Adds a meter unless one of that type and user is in memory (whose
    /// changes are kept).
    fn insert(&mut self, (type_id, user_id): MeterKey, slot: Slot, closed: bool) {
        let meters = self.by_user.entry(user_id).or_default();
        if meters.find(type_id).is_none() {
            meters.push(type_id, self.slots.len());
            self.heads.push((closed, slot.state.aggregation));
            self.slots.push(slot);
        }
    }

    fn len(&self) -> usize {
        self.slots.len()
    }

    fn clear(&mut self) {
        self.slots.clear();
        self.heads.clear();
        self.by_user.clear();
    }
}

/// Meters a one-transaction run keeps in memory before writing them back.
const MAX_KEPT_METERS: usize = 200_000;
/// Audit rows a one-transaction run keeps in memory before writing them.
const MAX_KEPT_AUDIT: usize = 200_000;

/// A meter's current period in memory.
struct Slot {
    /// Negative: a meter a simulation would create.
    id: i64,
    state: MeterState,
    period_start: Timestamp,
    dirty: bool,
    new: bool,
}

/// A taken record as pass 2 applies it.
struct Applying<'r> {
    index: usize,
    rule: &'r Rule,
    /// Its meter in `Meters::slots`; `None` until a meter to create is created.
    slot: Option<usize>,
    contribution: Contribution,
    at: Timestamp,
}

/// A record a rule took, before deduplication and application: what pass 2
/// applies, and the ids meter creation and claims read, borrowed from the record's
/// extracted fields (pass 2 takes those over, so it keeps only `applying`).
struct Taken<'r, 'e> {
    applying: Applying<'r>,
    type_id: i64,
    user_id: &'e str,
    record_id: Option<&'e str>,
}

pub struct Processor<'s> {
    stream: &'s Stream,
    mode: Mode,
    session_id: Option<i64>,
    clock: Clock,
    types: HashMap<String, MeterTypeSettings>,
    /// The meter type of each of the stream's rules, by the rule's position.
    rule_types: Vec<Option<MeterTypeSettings>>,
    /// The meters of the users seen, as changed. Apply writes them back after each
    /// chunk, or (`keep_meters`, in a one-transaction run) at `finish`.
    meters: Meters,
    /// Keep meters (locked, changed in memory) across chunks instead of writing
    /// them back after each: a run in one transaction rewrites each meter once.
    keep_meters: bool,
    /// This transaction holds the stream's run lock (`locks::stream`): no other
    /// transaction claims this stream's record ids meanwhile.
    holds_stream: bool,
    /// Holding the stream, in a database with `meter.dedupe_ranges` (0.2.0 on):
    /// ids are looked up in ranges too, and (in a batch stream) claimed as ranges.
    /// Only runs look: realtime calls claim ids through the unique index of
    /// `meter.dedupe_keys`, and a realtime stream has no ranges.
    ranges: bool,
    /// Audit rows not written yet (a one-transaction run batches them per meter).
    audit: AuditRows,
    /// Simulate only: record ids a real run would have claimed by now.
    simulated_claims: HashSet<String>,
    /// Simulate only: unique_count values a real run would have stored by now.
    simulated_seen: HashSet<(i64, String, String)>,
    next_simulated_id: i64,
}

impl<'s> Processor<'s> {
    pub fn new(stream: &'s Stream, mode: Mode, session_id: Option<i64>, now: Timestamp) -> Result<Processor<'s>> {
        let names: Vec<String> = stream.rules.meter_types().map(str::to_string).collect();
        let types: HashMap<String, MeterTypeSettings> = catalog::load_meter_types(&names)?.into_iter().collect();
        let rule_types = stream
            .rules
            .meter_types()
            .map(|name| types.get(name).cloned())
            .collect();
        Ok(Processor {
            stream,
            mode,
            session_id,
            clock: Clock {
                now,
                future_tolerance: gucs::future_tolerance(),
            },
            types,
            rule_types,
            meters: Meters::default(),
            keep_meters: mode == Mode::Simulate,
            holds_stream: false,
            ranges: false,
            audit: AuditRows::default(),
            simulated_claims: HashSet::default(),
            simulated_seen: HashSet::default(),
            next_simulated_id: -1,
        })
    }

    /// Keeps meters and audit rows in memory across chunks until `finish` (Apply
    /// in one transaction). Bounded: past
    /// `MAX_KEPT_METERS` meters or `MAX_KEPT_AUDIT` audit rows, they are written.
    pub fn keep_meters(mut self) -> Self {
        self.keep_meters = true;
        self.reserve_kept_audit();
        self
    }

    /// Room for the audit rows a one-transaction run keeps before writing them
    /// (and a chunk past that): address space only, until rows fill it.
    fn reserve_kept_audit(&mut self) {
        if self.keep_meters && self.mode == Mode::Apply && self.stream.audit {
            self.audit.reserve(MAX_KEPT_AUDIT + gucs::chunk_len());
        }
    }

    /// Takes the stream's run lock for the transaction (a no-op for a run, which
    /// holds it from its start): record ids are then claimed by a probe and a
    /// plain insert, which costs less per record than `ON CONFLICT` (see
    /// `claim_record_ids`).
    pub fn holding_stream(mut self) -> Result<Self> {
        locks::stream(self.stream.id, true)?;
        self.holds_stream = true;
        self.ranges = dedupe::ranges_exist()?;
        Ok(self)
    }

    /// Writes back every meter changed, and every audit row, not written yet.
    pub fn finish(&mut self) -> Result<()> {
        if self.mode == Mode::Apply {
            self.write_meters()?;
            self.write_audit()?;
        }
        Ok(())
    }

    fn write_audit(&mut self) -> Result<()> {
        let rows = std::mem::take(&mut self.audit);
        if self.stream.audit {
            rows.insert(self.stream.id, self.session_id)?;
        }
        Ok(())
    }

    /// Processes one chunk, in input order, and returns what happened to each record.
    pub fn process(&mut self, inputs: &[Input]) -> Result<Vec<Outcome<'s>>> {
        if !self.keep_meters {
            // Each chunk reads its meters afresh: memory stays bounded by the chunk.
            self.meters.clear();
        }
        let fields = &self.stream.fields;
        let mut extracted: Vec<std::result::Result<Extracted, Rejection>> = inputs
            .iter()
            .map(|input| match &input.unreadable {
                Some(rejection) => Err(rejection.clone()),
                None => extract(input.view(), fields, &self.clock),
            })
            .collect();
        let users: Vec<&str> = extracted
            .iter()
            .filter_map(|e| e.as_ref().ok().map(|e| e.user_id.as_str()))
            .filter(|u| !self.meters.is_loaded(u))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        self.load_meters(&users)?;

        // Pass 1: rules, activity windows, values.
        let mut outcomes: Vec<Option<Outcome>> = vec![None; inputs.len()];
        let mut taken: Vec<Taken> = Vec::with_capacity(inputs.len());
        let mut to_create: HashSet<MeterKey> = HashSet::default();
        let stream = self.stream;
        for (index, result) in extracted.iter().enumerate() {
            let record = match result {
                Ok(e) => e,
                Err(rejection) => {
                    outcomes[index] = Some(rejected(rejection, None));
                    continue;
                }
            };
            let at = record.at(&self.clock);
            let mut found = None;
            let decision = stream.rules.evaluate(inputs[index].view(), |rule| {
                found = Some(self.check_rule(rule, &record.user_id, at)?);
                Ok(())
            });
            match decision {
                Decision::Rejected { rejection, last_rule } => {
                    outcomes[index] = Some(rejected(&rejection, last_rule.map(str::to_string)));
                }
                Decision::Taken(rule) => {
                    let (settings, slot) = found.expect("a rule taking a record found its meter");
                    if slot.is_none() {
                        to_create.insert((settings.id, record.user_id.clone()));
                    }
                    // An existing meter keeps its period's aggregation; a new one takes the type's.
                    let aggregation = slot.map_or(settings.aggregation, |at| self.meters.heads[at].1);
                    match Contribution::from_value(aggregation, record.value, &fields.value, &rule.meter_type) {
                        Ok(contribution) => taken.push(Taken {
                            applying: Applying {
                                index,
                                rule,
                                slot,
                                contribution,
                                at,
                            },
                            type_id: settings.id,
                            user_id: &record.user_id,
                            record_id: record.record_id.as_deref(),
                        }),
                        Err(rejection) => outcomes[index] = Some(rejected(&rejection, Some(rule.name.clone()))),
                    }
                }
            }
        }

        if !to_create.is_empty() {
            self.create_meters(to_create)?;
            for item in taken.iter_mut().filter(|t| t.applying.slot.is_none()) {
                item.applying.slot = self.meters.find(item.type_id, item.user_id);
            }
        }
        let duplicates = self.claim_record_ids(&taken)?;

        // Pass 2: apply, in input order.
        let (existing_seen, mut fresh_seen) = (self.load_seen(&taken, &duplicates, inputs)?, HashSet::default());
        // Without their borrows of `extracted`, whose ids each record's outcome and
        // audit row then take over instead of copying.
        let taken: Vec<Applying> = taken.into_iter().map(|t| t.applying).collect();
        let (mut carry_first, mut carry_last) = (Vec::new(), Vec::new());
        for item in taken {
            let input = &inputs[item.index];
            let record = extracted[item.index].as_mut().expect("taken records were extracted");
            let user_id = std::mem::take(&mut record.user_id);
            let record_id = record.record_id.take();
            if duplicates.contains(&item.index) {
                outcomes[item.index] = Some(Outcome::Duplicate {
                    record_id: record_id.unwrap_or_default(),
                    rule: &item.rule.name,
                    user_id,
                });
                continue;
            }
            let slot = &mut self.meters.slots[item.slot.expect("taken records have a meter")];
            carried(input.view(), &item.rule.carry_first, &mut carry_first);
            carried(input.view(), &item.rule.carry_last, &mut carry_last);
            let usage = Usage {
                contribution: item.contribution,
                at: item.at,
                group: GroupRef::of(input.view(), &item.rule.group_by),
                carry_first: &carry_first,
                carry_last: &carry_last,
            };
            let value = match self.mode {
                Mode::Apply => {
                    let mut seen = StoredSeen {
                        meter_id: slot.id,
                        existing: &existing_seen,
                        fresh: &mut fresh_seen,
                    };
                    slot.state.apply(&usage, &mut seen)
                }
                Mode::Simulate => {
                    let mut seen = StoredSeen {
                        meter_id: slot.id,
                        existing: &existing_seen,
                        fresh: &mut self.simulated_seen,
                    };
                    slot.state.apply(&usage, &mut seen)
                }
            };
            slot.dirty = true;
            if self.mode == Mode::Apply && self.stream.audit {
                self.audit.push(AuditedRecord {
                    meter_id: slot.id,
                    user_id: &user_id,
                    period_start: slot.period_start,
                    usage_id: input.usage_id,
                    record_id,
                    rule: &item.rule.name,
                    amount: &value,
                    at: item.at,
                });
            }
            outcomes[item.index] = Some(Outcome::Metered {
                rule: &item.rule.name,
                meter_id: (slot.id > 0).then_some(slot.id),
                meter_type: &item.rule.meter_type,
                user_id,
                value,
                new_meter: slot.new,
            });
        }
        let outcomes: Vec<Outcome> = outcomes
            .into_iter()
            .map(|o| o.expect("every record has an outcome"))
            .collect();

        if self.mode == Mode::Apply {
            if !self.keep_meters || self.meters.len() > MAX_KEPT_METERS {
                self.write_meters()?;
                if self.keep_meters {
                    // Written back and still locked by this transaction: reading
                    // them again later is safe.
                    self.meters.clear();
                }
            }
            store_seen(&fresh_seen)?;
            if !self.keep_meters || self.audit.len() > MAX_KEPT_AUDIT {
                self.write_audit()?;
                self.reserve_kept_audit();
            }
            insert_rejected(&self.stream.name, self.session_id, inputs.iter().zip(&outcomes))?;
        }
        Ok(outcomes)
    }

    /// Whether `rule` may take a record of `user_id` at `at`, and into which
    /// meter: its slot, or `None` for a meter to create (auto-creation); `Err`
    /// when the record falls through.
    fn check_rule(
        &self,
        rule: &Rule,
        user_id: &str,
        at: Timestamp,
    ) -> std::result::Result<(&MeterTypeSettings, Option<usize>), Rejection> {
        let settings = self
            .stream
            .rules
            .index_of(rule)
            .and_then(|at| self.rule_types[at].as_ref());
        let Some(settings) = settings else {
            // Rules are validated against existing meter types, and a type named by
            // a rule cannot be dropped; this only guards a concurrent change.
            return Err(Rejection::NoMeter {
                user_id: user_id.to_string(),
                meter_type: rule.meter_type.clone(),
                rule: rule.name.clone(),
            });
        };
        if let Some(from) = settings.active_from.filter(|from| at < *from) {
            return Err(Rejection::BeforeActiveFrom {
                at,
                meter_type: settings.name.clone(),
                active_from: from,
            });
        }
        if let Some(to) = settings.active_to.filter(|to| at >= *to) {
            return Err(Rejection::AfterActiveTo {
                at,
                meter_type: settings.name.clone(),
                active_to: to,
            });
        }
        match self.meters.find(settings.id, user_id) {
            Some(at) if self.meters.heads[at].0 => Err(Rejection::MeterClosed {
                meter_id: self.meters.slots[at].id,
                meter_type: settings.name.clone(),
            }),
            Some(at) => Ok((settings, Some(at))),
            None if !self.stream.auto_create_meters => Err(Rejection::NoMeter {
                user_id: user_id.to_string(),
                meter_type: settings.name.clone(),
                rule: rule.name.clone(),
            }),
            None => Ok((settings, None)),
        }
    }

    /// Loads (and in `Apply`, locks) the stream's meters of these users, keeping
    /// any already in memory (after creating meters, they are loaded again).
    fn load_meters(&mut self, users: &[&str]) -> Result<()> {
        if users.is_empty() {
            return Ok(());
        }
        // Meters of types the rules no longer name are not this run's.
        let type_ids: HashSet<i64> = self.types.values().map(|t| t.id).collect();
        let lock = if self.mode == Mode::Apply { "FOR UPDATE" } else { "" };
        let query = format!(
            "SELECT id, meter_type_id, user_id, aggregation, value::text, groups::text, carry_first::text,
                    carry_last::text, aggregation_state::text, first_record_at, last_record_at, record_count,
                    period_start, closed_at IS NOT NULL
               FROM meter.meters
              WHERE stream_id = $1 AND user_id = ANY($2)
              ORDER BY id {lock}"
        );
        // A generic plan that looks the users up: planned for this stream's id, a
        // custom plan trusts the statistics about it, and for a stream that grew
        // since the last ANALYZE (a realtime stream auto-creating meters) it read
        // the stream's every meter on each call, filtering by user.
        let rows = sql::with_generic_lookups(|| {
            Spi::connect_mut(|client| -> Result<Vec<(MeterKey, Slot, bool)>> {
                let mut rows = Vec::with_capacity(users.len() * type_ids.len());
                for row in sql::run(client, &query, &[self.stream.id.into(), users.to_vec().into()])? {
                    let type_id = row.get::<i64>(2)?.unwrap();
                    if !type_ids.contains(&type_id) {
                        continue;
                    }
                    let stored = StoredState {
                        aggregation: row.get::<String>(4)?.unwrap(),
                        value: row.get::<String>(5)?,
                        groups: row.get::<String>(6)?.unwrap(),
                        carry_first: row.get::<String>(7)?.unwrap(),
                        carry_last: row.get::<String>(8)?.unwrap(),
                        aggregation_state: row.get::<String>(9)?,
                        first_record_at: row.get::<TimestampWithTimeZone>(10)?.and_then(to_timestamp),
                        last_record_at: row.get::<TimestampWithTimeZone>(11)?.and_then(to_timestamp),
                        record_count: row.get::<i64>(12)?.unwrap(),
                    };
                    rows.push((
                        (type_id, row.get::<String>(3)?.unwrap()),
                        Slot {
                            id: row.get::<i64>(1)?.unwrap(),
                            state: stored.into_state(),
                            period_start: row.get::<TimestampWithTimeZone>(13)?.and_then(to_timestamp).unwrap(),
                            dirty: false,
                            new: false,
                        },
                        row.get::<bool>(14)?.unwrap(),
                    ));
                }
                Ok(rows)
            })
        })?;
        self.meters.slots.reserve(rows.len());
        self.meters.heads.reserve(rows.len());
        for (key, slot, closed) in rows {
            self.meters.insert(key, slot, closed);
        }
        for user in users {
            self.meters.mark_loaded(user);
        }
        Ok(())
    }

    /// Creates the meters auto-creation asked for. `Apply` inserts them (a
    /// concurrent creator may win; its meter is loaded and locked instead).
    fn create_meters(&mut self, keys: HashSet<MeterKey>) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let by_id: HashMap<i64, &MeterTypeSettings> = self.types.values().map(|t| (t.id, t)).collect();
        match self.mode {
            Mode::Apply => {
                let new: Vec<NewMeter> = keys
                    .iter()
                    .map(|(type_id, user_id)| NewMeter {
                        settings: by_id[type_id],
                        user_id,
                        delete_on_reset: false,
                    })
                    .collect();
                let created = catalog::insert_meters(self.stream.id, &new, self.clock.now)?;
                let users: Vec<&str> = keys
                    .iter()
                    .map(|(_, u)| u.as_str())
                    .collect::<HashSet<_>>()
                    .into_iter()
                    .collect();
                self.load_meters(&users)?;
                let created: HashSet<i64> = created.into_iter().collect();
                for slot in self.meters.slots.iter_mut().filter(|s| created.contains(&s.id)) {
                    slot.new = true;
                }
            }
            Mode::Simulate => {
                for key in keys {
                    let settings = by_id[&key.0];
                    let period = crate::schedule::first_period(
                        &settings.schedule,
                        &settings.tz,
                        self.clock.now,
                        settings.active_from,
                    );
                    let id = self.next_simulated_id;
                    self.next_simulated_id -= 1;
                    self.meters.insert(
                        key,
                        Slot {
                            id,
                            state: MeterState::reset(settings.aggregation),
                            period_start: period.start,
                            dirty: false,
                            new: true,
                        },
                        false,
                    );
                }
            }
        }
        Ok(())
    }

    /// Claims the record ids of taken records; returns the indexes of duplicates:
    /// ids seen earlier in the chunk, or already claimed within the retention.
    fn claim_record_ids(&mut self, taken: &[Taken]) -> Result<HashSet<usize>> {
        let mut duplicates = HashSet::default();
        let mut first_in_chunk: HashMap<&str, usize> =
            HashMap::with_capacity_and_hasher(taken.len(), Default::default());
        for item in taken {
            if let Some(id) = item.record_id {
                if first_in_chunk.contains_key(id) {
                    duplicates.insert(item.applying.index);
                } else {
                    first_in_chunk.insert(id, item.applying.index);
                }
            }
        }
        if first_in_chunk.is_empty() {
            return Ok(duplicates);
        }
        // Each id once: its first record claims it. In the index's order ("C", byte
        // order): random ids (UUIDs) are then looked up and inserted from one end of
        // the index to the other, each descent near the last one, which took 15% off
        // their inserts.
        let mut claiming: Vec<&Taken> = taken
            .iter()
            .filter(|t| t.record_id.is_some_and(|id| first_in_chunk[id] == t.applying.index))
            .collect();
        claiming.sort_unstable_by_key(|t| t.record_id);
        let now = to_timestamptz(self.clock.now);
        let forget_before = to_timestamptz(self.clock.now - gucs::dedupe_retention());
        // The ids that do not count (again).
        let seen_before: HashSet<String> = match self.mode {
            Mode::Apply if self.holds_stream => self.claim_holding_stream(&claiming, now, forget_before)?,
            // A realtime stream's ids are all rows: batch runs claim ranges only
            // in batch streams, and a stream turned realtime has its ranges
            // turned into rows (`catalog::alter_stream`).
            Mode::Apply => {
                let claimed: HashSet<String> = self
                    .upsert_record_ids(&claiming, now, forget_before)?
                    .into_iter()
                    .collect();
                first_in_chunk
                    .keys()
                    .filter(|id| !claimed.contains(**id))
                    .map(|id| id.to_string())
                    .collect()
            }
            Mode::Simulate => {
                let ids: Vec<String> = claiming
                    .iter()
                    .filter_map(|t| t.record_id.map(str::to_string))
                    .collect();
                let known: HashSet<String> =
                    dedupe::metered_among(self.stream.id, &ids, forget_before, gucs::chunk_len(), false)?
                        .into_iter()
                        .collect();
                ids.into_iter()
                    .filter(|id| known.contains(id) || !self.simulated_claims.insert(id.clone()))
                    .collect()
            }
        };
        for (id, index) in first_in_chunk {
            if seen_before.contains(id) {
                duplicates.insert(index);
            }
        }
        Ok(duplicates)
    }

    /// The ids of `claiming` that ranges seen at or after `forget_before` hold,
    /// looked up by halves (`dedupe::in_ranges_by_halves`). A stretch of ids still
    /// over its budget has the ranges it overlaps turned into rows of
    /// `meter.dedupe_keys` instead (this transaction holds the stream), where the
    /// per-id probe finds them.
    fn in_fresh_ranges(&self, claiming: &[&Taken], forget_before: TimestampWithTimeZone) -> Result<HashSet<String>> {
        let mut found = HashSet::default();
        if !self.ranges {
            return Ok(found);
        }
        let mut ids: Vec<&str> = claiming.iter().filter_map(|t| t.record_id).collect();
        for run in dedupe::same_length_runs(&mut ids, |id| id) {
            let looked_up = dedupe::in_ranges_by_halves(self.stream.id, run, forget_before)?;
            found.extend(looked_up.found);
            for stretch in looked_up.crowded {
                dedupe::ranges_to_keys(self.stream.id, Some(stretch))?;
            }
        }
        Ok(found)
    }

    /// Claims ids while this transaction holds the stream's run lock: nobody else
    /// claims them meanwhile, so the ids not found are inserted plainly and cannot
    /// conflict (if one did, the run would fail and roll back, losing nothing).
    /// Returns the ids seen before and still within the retention.
    ///
    /// Ids held by ranges seen within the retention are seen; the others are
    /// probed (`dedupe::known_among`), which reads the stream's ids within the
    /// chunk's range, or looks each id up when that range holds many, and returns
    /// only the ids found, usually none. Probe and plain insert cost less than ON
    /// CONFLICT's lookups, and returning every claimed id cost a string per record.
    fn claim_holding_stream(
        &self,
        claiming: &[&Taken],
        now: TimestampWithTimeZone,
        forget_before: TimestampWithTimeZone,
    ) -> Result<HashSet<String>> {
        let in_ranges = self.in_fresh_ranges(claiming, forget_before)?;
        let claiming: Vec<&Taken> = claiming
            .iter()
            .copied()
            .filter(|t| t.record_id.is_none_or(|id| !in_ranges.contains(id)))
            .collect();
        let claimed_ids: Vec<&str> = claiming.iter().filter_map(|t| t.record_id).collect();
        // Every id seen, expired ones included: those are claimed again by upsert.
        let known: HashSet<String> = dedupe::known_among(
            self.stream.id,
            &claimed_ids,
            || claimed_ids.clone().into(),
            TimestampWithTimeZone::negative_infinity(),
        )?
        .into_iter()
        .collect();
        if known.is_empty() {
            // The usual case: every id is new.
            self.insert_claims(&claiming, now)?;
            return Ok(in_ranges);
        }
        let (seen, new): (Vec<&Taken>, Vec<&Taken>) = claiming
            .iter()
            .partition(|t| t.record_id.is_some_and(|id| known.contains(id)));
        self.insert_claims(&new, now)?;
        // Ids seen before: those past the retention count again.
        let renewed: HashSet<String> = self.upsert_record_ids(&seen, now, forget_before)?.into_iter().collect();
        Ok(known
            .into_iter()
            .filter(|id| !renewed.contains(id))
            .chain(in_ranges)
            .collect())
    }

    /// Inserts the claims of ids the stream never saw, `at` the time given: each
    /// run of ids of one length as a range where `ranges` (in a batch stream) and
    /// `dedupe::parts_to_claim_as_ranges` allow, the rest as rows (`insert_claim_rows`).
    fn insert_claims(&self, new: &[&Taken], at: TimestampWithTimeZone) -> Result<()> {
        // A realtime stream's transactions claim ids concurrently, through the
        // unique index: its ids stay rows.
        if !self.ranges || self.stream.mode != StreamMode::Batch {
            return self.insert_claim_rows(new, at);
        }
        let (mut new, mut rows) = (new.to_vec(), Vec::new());
        for run in dedupe::same_length_runs(&mut new, |t| t.record_id.unwrap_or_default()) {
            let ids: Vec<&str> = run.iter().filter_map(|t| t.record_id).collect();
            if ids.len() < run.len() {
                rows.extend_from_slice(run);
                continue;
            }
            // The parts are in order: the items between them are rows.
            let mut next = 0;
            for part in dedupe::parts_to_claim_as_ranges(self.stream.id, &ids)? {
                rows.extend_from_slice(&run[next..part.start]);
                let meters = run[part.clone()].iter().map(|t| self.claimed_meter(t)).collect();
                dedupe::claim_range(self.stream.id, &ids[part.clone()], meters, at)?;
                next = part.end;
            }
            rows.extend_from_slice(&run[next..]);
        }
        self.insert_claim_rows(&rows, at)
    }

    /// Inserts claims as rows of `meter.dedupe_keys`: appended as COPY appends
    /// rows (`Appender`), or by an INSERT where the table has triggers or row
    /// security.
    fn insert_claim_rows(&self, new: &[&Taken], at: TimestampWithTimeZone) -> Result<()> {
        if new.is_empty() {
            return Ok(());
        }
        let table = sql::one::<pg_sys::Oid>("SELECT 'meter.dedupe_keys'::pg_catalog.regclass::pg_catalog.oid", &[])?
            .expect("the claims table has an oid");
        if let Some(mut appender) = Appender::open(table, &["stream_id", "record_id", "seen_at", "meter_id"]) {
            let (stream_id, seen_at) = (self.stream.id.into_datum(), at.into_datum());
            for item in new {
                let record_id = item.record_id.map(|id| appender.text(id));
                appender.push(&[
                    stream_id,
                    record_id,
                    seen_at,
                    self.claimed_meter(item).map(pg_sys::Datum::from),
                ]);
            }
            appender.finish();
            return Ok(());
        }
        let ids: Vec<&str> = new.iter().filter_map(|t| t.record_id).collect();
        let meters: Vec<Option<i64>> = new.iter().map(|t| self.claimed_meter(t)).collect();
        sql::execute(
            "INSERT INTO meter.dedupe_keys (stream_id, record_id, seen_at, meter_id)
             SELECT $1, c.id, $3, c.meter FROM unnest($2::text[], $4::bigint[]) AS c(id, meter)",
            &[self.stream.id.into(), ids.into(), at.into(), meters.into()],
        )?;
        Ok(())
    }

    /// The meter a claimed id's record goes to (none yet for a simulated new meter).
    fn claimed_meter(&self, item: &Taken) -> Option<i64> {
        item.applying
            .slot
            .map(|at| self.meters.slots[at].id)
            .filter(|id| *id > 0)
    }

    /// Claims ids that concurrent transactions may claim too (realtime metering):
    /// ON CONFLICT waits for the other and counts the id once. Returns the ids
    /// claimed now: new ones, and known ones past `meter_ext.dedupe_retention`.
    /// ON CONFLICT finds a known id through the unique index whatever the planner
    /// believes about the table's size (a probe planned by stale statistics, right
    /// after the table grew, could scan it whole).
    fn upsert_record_ids(
        &self,
        claiming: &[&Taken],
        now: TimestampWithTimeZone,
        forget_before: TimestampWithTimeZone,
    ) -> Result<Vec<String>> {
        let ids: Vec<&str> = claiming.iter().filter_map(|t| t.record_id).collect();
        let meter_ids: Vec<Option<i64>> = claiming.iter().map(|t| self.claimed_meter(t)).collect();
        sql::strings(
            "INSERT INTO meter.dedupe_keys AS k (stream_id, record_id, seen_at, meter_id)
             SELECT $1, c.id, $3, c.meter FROM unnest($2::text[], $5::bigint[]) AS c(id, meter)
             ON CONFLICT (stream_id, record_id) DO UPDATE SET seen_at = EXCLUDED.seen_at, meter_id = EXCLUDED.meter_id
              WHERE k.seen_at < $4
             RETURNING record_id",
            &[
                self.stream.id.into(),
                ids.into(),
                now.into(),
                forget_before.into(),
                meter_ids.into(),
            ],
        )
    }

    /// The unique_count values already stored for the meters this chunk touches.
    fn load_seen(
        &self,
        taken: &[Taken],
        duplicates: &HashSet<usize>,
        inputs: &[Input],
    ) -> Result<HashSet<(i64, String, String)>> {
        let (mut meter_ids, mut groups, mut values) = (Vec::new(), Vec::new(), Vec::new());
        for item in taken
            .iter()
            .map(|t| &t.applying)
            .filter(|a| !duplicates.contains(&a.index))
        {
            let Contribution::Distinct(value) = &item.contribution else {
                continue;
            };
            let slot = &self.meters.slots[item.slot.expect("taken records have a meter")];
            if slot.id < 0 {
                continue;
            }
            meter_ids.push(slot.id);
            groups.push(String::new());
            values.push(value.clone());
            if let Some(group) = GroupRef::of(inputs[item.index].view(), &item.rule.group_by) {
                meter_ids.push(slot.id);
                groups.push(group.key);
                values.push(value.clone());
            }
        }
        if meter_ids.is_empty() {
            return Ok(HashSet::default());
        }
        Spi::connect_mut(|client| {
            let mut seen = HashSet::default();
            let rows = sql::run(
                client,
                "SELECT d.meter_id, d.group_key, d.value_key
                   FROM meter.meter_distinct d
                   JOIN unnest($1::bigint[], $2::text[], $3::text[]) AS c(meter_id, group_key, value_key)
                     ON (d.meter_id, d.group_key, d.value_key) = (c.meter_id, c.group_key, c.value_key)",
                &[meter_ids.into(), groups.into(), values.into()],
            )?;
            for row in rows {
                seen.insert((
                    row.get::<i64>(1)?.unwrap(),
                    row.get::<String>(2)?.unwrap(),
                    row.get::<String>(3)?.unwrap(),
                ));
            }
            Ok(seen)
        })
    }

    /// Writes every changed meter back in one statement.
    fn write_meters(&mut self) -> Result<()> {
        let mut rows = MeterRows::default();
        for slot in self.meters.slots.iter_mut().filter(|s| s.dirty) {
            rows.push(slot.id, StoredState::from_state(&slot.state));
            slot.dirty = false;
        }
        rows.update()
    }
}

fn rejected<'s>(rejection: &Rejection, rule: Option<String>) -> Outcome<'s> {
    Outcome::Rejected {
        code: rejection.code(),
        reason: rejection.to_string(),
        rule,
    }
}

/// The fields of `paths` the record has, into `into` (a buffer each record reuses).
fn carried<'a>(record: RecordRef<'a>, paths: &'a [crate::record::FieldPath], into: &mut Vec<(&'a str, &'a Value)>) {
    into.clear();
    into.extend(paths.iter().filter_map(|p| record.get(p).map(|v| (p.as_str(), v))));
}

/// unique_count memory: values stored before this chunk, plus those this chunk adds.
struct StoredSeen<'a> {
    meter_id: i64,
    existing: &'a HashSet<(i64, String, String)>,
    fresh: &'a mut HashSet<(i64, String, String)>,
}

impl SeenValues for StoredSeen<'_> {
    fn first_sighting(&mut self, group_key: &str, value_key: &str) -> bool {
        let key = (self.meter_id, group_key.to_string(), value_key.to_string());
        !self.existing.contains(&key) && self.fresh.insert(key)
    }
}

fn store_seen(fresh: &HashSet<(i64, String, String)>) -> Result<()> {
    if fresh.is_empty() {
        return Ok(());
    }
    let (mut ids, mut groups, mut values) = (Vec::new(), Vec::new(), Vec::new());
    for (id, group, value) in fresh {
        ids.push(*id);
        groups.push(group.clone());
        values.push(value.clone());
    }
    sql::execute(
        "INSERT INTO meter.meter_distinct (meter_id, group_key, value_key)
         SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[])",
        &[ids.into(), groups.into(), values.into()],
    )?;
    Ok(())
}

/// A meter's state as stored in its row (text for numeric and jsonb columns).
struct StoredState {
    aggregation: String,
    value: Option<String>,
    groups: String,
    carry_first: String,
    carry_last: String,
    aggregation_state: Option<String>,
    first_record_at: Option<Timestamp>,
    last_record_at: Option<Timestamp>,
    record_count: i64,
}

fn decimal(text: &str) -> Option<BigDecimal> {
    text.parse().ok()
}

fn json_number(value: &BigDecimal) -> Value {
    Value::Number(value.to_plain_string().parse().expect("a decimal is a JSON number"))
}

impl StoredState {
    fn into_state(self) -> MeterState {
        let aggregation: Aggregation = self.aggregation.parse().unwrap_or(Aggregation::Sum);
        let state: Value = self
            .aggregation_state
            .as_deref()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or(Value::Null);
        let time = |v: Option<&Value>| v.and_then(Value::as_str).and_then(|s| s.parse::<Timestamp>().ok());
        let mut groups = crate::aggregate::Groups::new();
        if let Ok(Value::Array(items)) = serde_json::from_str::<Value>(&self.groups) {
            for item in items {
                let Some(key) = item.get("key").and_then(Value::as_str).map(str::to_string) else {
                    continue;
                };
                let fields = item
                    .get("fields")
                    .and_then(Value::as_object)
                    .map(|fields| fields.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                    .unwrap_or_default();
                let value = item
                    .get("value")
                    .and_then(Value::as_number)
                    .and_then(|n| decimal(n.as_str()));
                let latest_at = time(state.get("groupLatestAt").and_then(|g| g.get(&key)));
                groups.insert(
                    key,
                    GroupState {
                        fields,
                        value,
                        latest_at,
                    },
                );
            }
        }
        // Carried fields in key order, as `MeterState` looks them up.
        let object = |text: &str| match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => {
                let mut fields: crate::aggregate::Fields = map.into_iter().collect();
                fields.sort_by(|a, b| a.0.cmp(&b.0));
                fields
            }
            _ => Vec::new(),
        };
        MeterState {
            aggregation,
            value: self.value.as_deref().and_then(decimal),
            latest_at: time(state.get("latestAt")),
            groups,
            carry_first: object(&self.carry_first),
            carry_last: object(&self.carry_last),
            first_record_at: self.first_record_at,
            last_record_at: self.last_record_at,
            record_count: self.record_count,
        }
    }

    fn from_state(state: &MeterState) -> StoredState {
        let groups: Vec<Value> = state
            .groups
            .iter()
            .map(|(key, g)| {
                serde_json::json!({
                    "key": key,
                    "fields": Value::Object(g.fields.iter().cloned().collect()),
                    "value": g.value.as_ref().map(json_number).unwrap_or(Value::Null),
                })
            })
            .collect();
        let aggregation_state = (state.aggregation == Aggregation::Latest).then(|| {
            let group_times: Map<String, Value> = state
                .groups
                .iter()
                .filter_map(|(k, g)| g.latest_at.map(|t| (k.clone(), Value::String(t.to_string()))))
                .collect();
            serde_json::json!({
                "latestAt": state.latest_at.map(|t| t.to_string()),
                "groupLatestAt": group_times,
            })
            .to_string()
        });
        StoredState {
            aggregation: state.aggregation.name().to_string(),
            value: state.value.as_ref().map(BigDecimal::to_plain_string),
            groups: Value::Array(groups).to_string(),
            carry_first: Value::Object(state.carry_first.iter().cloned().collect()).to_string(),
            carry_last: Value::Object(state.carry_last.iter().cloned().collect()).to_string(),
            aggregation_state,
            first_record_at: state.first_record_at,
            last_record_at: state.last_record_at,
            record_count: state.record_count,
        }
    }
}

/// Column arrays for the one UPDATE that writes a chunk's meters.
#[derive(Default)]
struct MeterRows {
    ids: Vec<i64>,
    values: Vec<Option<String>>,
    groups: Vec<String>,
    carry_first: Vec<String>,
    carry_last: Vec<String>,
    states: Vec<Option<String>>,
    first_at: Vec<Option<TimestampWithTimeZone>>,
    last_at: Vec<Option<TimestampWithTimeZone>>,
    counts: Vec<i64>,
}

impl MeterRows {
    fn push(&mut self, id: i64, s: StoredState) {
        self.ids.push(id);
        self.values.push(s.value);
        self.groups.push(s.groups);
        self.carry_first.push(s.carry_first);
        self.carry_last.push(s.carry_last);
        self.states.push(s.aggregation_state);
        self.first_at.push(s.first_record_at.map(to_timestamptz));
        self.last_at.push(s.last_record_at.map(to_timestamptz));
        self.counts.push(s.record_count);
    }

    fn update(self) -> Result<()> {
        if self.ids.is_empty() {
            return Ok(());
        }
        // A realtime call writes a meter or a few: by key, from a generic plan.
        sql::with_generic_lookups(|| {
            sql::execute(
                "UPDATE meter.meters m
                SET value = u.value::numeric, groups = u.groups::jsonb, carry_first = u.carry_first::jsonb,
                    carry_last = u.carry_last::jsonb, aggregation_state = u.state::jsonb,
                    first_record_at = u.first_at, last_record_at = u.last_at, record_count = u.count,
                    updated_at = now()
               FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                           $7::timestamptz[], $8::timestamptz[], $9::bigint[])
                    AS u(id, value, groups, carry_first, carry_last, state, first_at, last_at, count)
              WHERE m.id = u.id",
                &[
                    self.ids.into(),
                    self.values.into(),
                    self.groups.into(),
                    self.carry_first.into(),
                    self.carry_last.into(),
                    self.states.into(),
                    self.first_at.into(),
                    self.last_at.into(),
                    self.counts.into(),
                ],
            )
        })?;
        Ok(())
    }
}

/// Stores rejected records, intact, with their reason and the rule evaluated last.
pub fn insert_rejected<'a, 's: 'a>(
    stream: &str,
    session_id: Option<i64>,
    items: impl Iterator<Item = (&'a Input, &'a Outcome<'s>)>,
) -> Result<()> {
    let (mut records, mut codes, mut reasons, mut rules) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (input, outcome) in items {
        if let Outcome::Rejected { code, reason, rule } = outcome {
            records.push(Some(input.whole_record_datum()));
            codes.push(*code);
            reasons.push(reason.as_str());
            rules.push(rule.as_deref());
        }
    }
    if records.is_empty() {
        return Ok(());
    }
    let records = sql::ElementType::of(pg_sys::JSONBOID).array_of(records, &mut sql::ArrayBuffers::default());
    sql::execute(
        "INSERT INTO meter.rejected (stream, session_id, record, code, reason, rule)
         SELECT $1, $2, r.record, r.code, r.reason, r.rule
           FROM unnest($3::jsonb[], $4::text[], $5::text[], $6::text[]) AS r(record, code, reason, rule)",
        &[
            stream.into(),
            session_id.into(),
            // SAFETY: a jsonb array, built just now in the current memory context.
            unsafe { DatumWithOid::new(records, pg_sys::JSONBARRAYOID) },
            codes.into(),
            reasons.into(),
            rules.into(),
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::UserMeters;

    #[test]
    fn a_users_meters_are_found_past_the_first_few() {
        let mut meters = UserMeters::default();
        assert_eq!(meters.find(1), None);
        for type_id in 1..=7 {
            meters.push(type_id * 10, type_id as usize + 100);
        }
        for type_id in 1..=7 {
            assert_eq!(meters.find(type_id * 10), Some(type_id as usize + 100));
        }
        assert_eq!(meters.find(80), None);
    }
}
