//! SPI helpers shared by the Postgres-facing modules.
//!
//! Every statement goes through a per-backend plan cache: it is parsed and
//! planned once, then executed from its saved plan (PostgreSQL revalidates saved
//! plans when the objects they use change). Realtime ingest runs a dozen short
//! statements per call; planning them each time cost more than running them.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::Oid;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult, SpiTupleTable};
use pgrx::{FromDatum, IntoDatum, PgOid};

use crate::errors::Result;

thread_local! {
    /// Saved plans by query text, then argument types: a lookup does not copy the text.
    static PLANS: RefCell<HashMap<String, HashMap<Vec<Oid>, Rc<OwnedPreparedStatement>>>> = RefCell::new(HashMap::new());
    static FRESH_PLANS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every statement planned afresh, for its actual arguments and the
/// tables' current sizes. Batch runs use this: their statements handle thousands
/// of rows, so planning is cheap next to them, while a plan cached when a table was
/// small (an index-less scan of a then-empty `dedupe_keys`, say) turns quadratic
/// as it grows.
pub fn with_fresh_plans<R>(f: impl FnOnce() -> R) -> R {
    let flag = FRESH_PLANS.with(std::cell::Cell::as_ptr);
    // SAFETY: this thread's flag, which lives as long as the thread.
    unsafe { with_global(flag, true, f) }
}

/// Sets a backend-global variable while `f` runs, and puts it back however `f`
/// ends (an ERROR unwinds through here).
///
/// # Safety
/// `variable` must stay valid while `f` runs and be used by this thread only.
unsafe fn with_global<T: Copy, R>(variable: *mut T, value: T, f: impl FnOnce() -> R) -> R {
    struct Restore<T: Copy>(*mut T, T);
    impl<T: Copy> Drop for Restore<T> {
        fn drop(&mut self) {
            // SAFETY: as promised by the caller of `with_global`.
            unsafe { *self.0 = self.1 }
        }
    }
    // SAFETY: as promised by the caller.
    let _restore = unsafe {
        let restore = Restore(variable, *variable);
        *variable = value;
        restore
    };
    f()
}

/// Runs `f` with PostgreSQL's allocations (statement arguments, converted
/// datums) going to a memory context deleted when it returns, so a long call (a
/// one-transaction run, a large realtime array) holds one chunk's worth, not every
/// chunk's until it ends. `f` must not keep anything palloc'd past its return:
/// what it keeps is Rust data.
pub fn in_chunk_context<R>(f: impl FnOnce() -> R) -> R {
    let mut context = pgrx::PgMemoryContexts::new("meter_ext chunk");
    // SAFETY: the context is valid until dropped, after `f` returns.
    unsafe { context.switch_to(|_| f()) }
}

/// Runs `f` with cached statements executed from generic plans. A custom plan
/// folds each argument into the plan as a constant, copying it: for the
/// statements that take a whole `ingest` array, one copy of the array each.
pub fn with_generic_plans<R>(f: impl FnOnce() -> R) -> R {
    let generic = pg_sys::PlanCacheMode::PLAN_CACHE_MODE_FORCE_GENERIC_PLAN as std::ffi::c_int;
    // SAFETY: a GUC variable of this backend, used by this thread only.
    unsafe { with_global(&raw mut pg_sys::plan_cache_mode, generic, f) }
}

/// Runs `f` with cached statements executed from one generic plan that finds
/// rows by index lookups, for the short statements a realtime call runs every
/// time: planning them for their arguments took longer than running them (13%
/// of a one-record call). Under `with_fresh_plans` (batch runs, thousands of rows
/// per statement) it changes nothing.
pub fn with_generic_lookups<R>(f: impl FnOnce() -> R) -> R {
    if FRESH_PLANS.with(|fresh| fresh.get()) {
        return f();
    }
    with_generic_plans(|| by_index_lookups(f))
}

/// Runs `f` with the planner joining by index lookups only (sequential scans,
/// hash and merge joins priced out), for statements that touch one chunk of a
/// large table by key: left to itself, the planner would rather scan (and hash)
/// the whole table once per chunk, which is quadratic over a million rows.
pub fn by_index_lookups<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: as in `with_generic_plans`.
    unsafe {
        with_global(&raw mut pg_sys::enable_seqscan, false, || {
            with_global(&raw mut pg_sys::enable_hashjoin, false, || {
                with_global(&raw mut pg_sys::enable_mergejoin, false, f)
            })
        })
    }
}

/// Runs `query` (read-write): from its cached plan, or planned afresh inside
/// `with_fresh_plans` (`plan_and_run`).
///
/// Never JIT-compiled: each statement here handles one chunk, and a plan whose
/// estimate passes `jit_above_cost` (the record-id probe's, with 10 000 index
/// lookups) was compiled again at every execution, in more time than it ran: 8%
/// of a batch run.
pub fn run<'conn>(
    client: &mut SpiClient<'conn>,
    query: &str,
    args: &[DatumWithOid],
) -> SpiResult<SpiTupleTable<'conn>> {
    // SAFETY: a GUC variable of this backend, used by this thread only.
    unsafe {
        with_global(&raw mut pg_sys::jit_enabled, false, || {
            plan_and_run(client, query, args)
        })
    }
}

fn plan_and_run<'conn>(
    client: &mut SpiClient<'conn>,
    query: &str,
    args: &[DatumWithOid],
) -> SpiResult<SpiTupleTable<'conn>> {
    if FRESH_PLANS.with(|fresh| fresh.get()) {
        return client.update(query, None, args);
    }
    let oids: Vec<Oid> = args.iter().map(DatumWithOid::oid).collect();
    let cached = PLANS.with(|plans| {
        plans
            .borrow()
            .get(query)
            .and_then(|by_types| by_types.get(&oids).cloned())
    });
    let plan = match cached {
        Some(plan) => plan,
        None => {
            let types: Vec<PgOid> = oids.iter().map(|oid| PgOid::from(*oid)).collect();
            let plan = Rc::new(client.prepare_mut(query, &types)?.keep());
            PLANS.with(|plans| {
                plans
                    .borrow_mut()
                    .entry(query.to_string())
                    .or_default()
                    .insert(oids, plan.clone())
            });
            plan
        }
    };
    client.update(&*plan, None, args)
}

/// Runs `query` and hands `row` each result row's columns, deformed in one pass
/// (pgrx reads a row one column at a time, each read walking over the columns
/// before it once any is NULL). The datums point into the result, which lasts
/// only while `row` runs.
pub fn for_each_row(
    query: &str,
    args: &[DatumWithOid],
    mut row: impl FnMut(&[pg_sys::Datum], &[bool]) -> Result<()>,
) -> Result<()> {
    Spi::connect_mut(|client| {
        let _result = run(client, query, args)?;
        // SAFETY: the result of the statement just run, kept alive by `_result`.
        unsafe {
            let table = pg_sys::SPI_tuptable;
            if table.is_null() {
                return Ok(());
            }
            let descriptor = (*table).tupdesc;
            let columns = (*descriptor).natts as usize;
            let (mut values, mut nulls) = (vec![pg_sys::Datum::from(0); columns], vec![true; columns]);
            for i in 0..(*table).numvals as usize {
                pg_sys::heap_deform_tuple(
                    *(*table).vals.add(i),
                    descriptor,
                    values.as_mut_ptr(),
                    nulls.as_mut_ptr(),
                );
                row(&values, &nulls)?;
            }
        }
        Ok(())
    })
}

/// The first column of the first row, or `None` when there is no row (or it is NULL).
pub fn one<T: FromDatum + IntoDatum>(query: &str, args: &[DatumWithOid]) -> Result<Option<T>> {
    Spi::connect_mut(|client| {
        let table = run(client, query, args)?;
        if table.is_empty() {
            return Ok(None);
        }
        Ok(table.first().get_one::<T>()?)
    })
}

/// Runs a statement and returns how many rows it touched.
pub fn execute(query: &str, args: &[DatumWithOid]) -> Result<usize> {
    Spi::connect_mut(|client| Ok(run(client, query, args)?.len()))
}

/// The first column of every row, as text.
pub fn strings(query: &str, args: &[DatumWithOid]) -> Result<Vec<String>> {
    Spi::connect_mut(|client| {
        let table = run(client, query, args)?;
        let mut out = Vec::with_capacity(table.len());
        for row in table {
            if let Some(s) = row.get::<String>(1)? {
                out.push(s);
            }
        }
        Ok(out)
    })
}

/// Whether `check` holds for this database's installation of meter_ext (a
/// schema object of a later version, say), remembered in `seen` once true: for
/// that installation only, so one dropped and created again is asked again.
pub fn true_for_installation(
    seen: &'static std::thread::LocalKey<std::cell::Cell<Oid>>,
    check: impl FnOnce() -> Result<bool>,
) -> Result<bool> {
    // SAFETY: a catalog lookup by name; missing_ok, so no ERROR.
    let extension = unsafe { pg_sys::get_extension_oid(c"meter_ext".as_ptr(), true) };
    if extension != pg_sys::InvalidOid && seen.get() == extension {
        return Ok(true);
    }
    let holds = check()?;
    if holds {
        seen.set(extension);
    }
    Ok(holds)
}

/// No SQL is built from user strings: every `format!` that makes a statement
/// interpolates only constants (UPPER_CASE) or names listed here with the reason
/// they are safe. User values travel as `$n` arguments, or through PostgreSQL's own
/// `format('%I', …)` / `%L` when a statement needs an identifier or literal.
#[cfg(test)]
mod dynamic_sql {
    /// Interpolations that are not user input, and why.
    const SAFE: &[(&str, &str)] = &[
        ("function", "locks.rs: one of two advisory-lock function names"),
        (
            "lock",
            "processor.rs, sessions.rs: a row-lock clause chosen between literals",
        ),
        (
            "condition",
            "catalog.rs: a &'static str WHERE clause; the value goes as $1",
        ),
    ];
    const STATEMENT_WORDS: &[&str] = &[
        "SELECT ",
        "INSERT ",
        "UPDATE ",
        "DELETE ",
        "CREATE ",
        "ALTER ",
        "DROP ",
        "CALL ",
        "TRUNCATE ",
        " SET ",
    ];

    /// The string literal starting at `text` (plain or raw), without its quotes.
    fn literal(text: &str) -> Option<&str> {
        let text = text.trim_start();
        let (hashes, body) = if let Some(raw) = text.strip_prefix('r') {
            let hashes = raw.len() - raw.trim_start_matches('#').len();
            (Some(hashes), raw[hashes..].strip_prefix('"')?)
        } else {
            (None, text.strip_prefix('"')?)
        };
        let end = match hashes {
            Some(n) => body.find(&format!("\"{}", "#".repeat(n)))?,
            None => {
                let bytes = body.as_bytes();
                let mut i = 0;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i
            }
        };
        Some(&body[..end])
    }

    /// The names interpolated by a format string (`{name}`, `{name:?}`, `{}`), skipping `{{`.
    fn interpolations(format: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut rest = format;
        while let Some(at) = rest.find('{') {
            if rest[at..].starts_with("{{") {
                rest = &rest[at + 2..];
                continue;
            }
            let close = rest[at..].find('}').map_or(rest.len(), |c| at + c);
            names.push(rest[at + 1..close].split(':').next().unwrap_or("").to_string());
            rest = &rest[(close + 1).min(rest.len())..];
        }
        names
    }

    fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if !path.ends_with("pg_tests") {
                    sources(&path, out);
                }
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn statements_interpolate_only_constants() {
        let mut files = Vec::new();
        sources(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut files,
        );
        let (mut statements, mut unsafe_interpolations) = (0, Vec::new());
        for file in &files {
            let text = std::fs::read_to_string(file).unwrap();
            // This module's own format! calls build no SQL.
            let text = text.split("mod dynamic_sql").next().unwrap();
            for (at, _) in text.match_indices("format!(") {
                let Some(format) = literal(&text[at + "format!(".len()..]) else {
                    continue;
                };
                if !STATEMENT_WORDS.iter().any(|w| format.contains(w)) {
                    continue;
                }
                statements += 1;
                for name in interpolations(format) {
                    let constant = !name.is_empty()
                        && name
                            .chars()
                            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
                    if !constant && !SAFE.iter().any(|(safe, _)| *safe == name) {
                        unsafe_interpolations.push(format!("{}: {{{name}}} in {format:?}", file.display()));
                    }
                }
            }
        }
        assert!(
            statements >= 3,
            "found only {statements} formatted statements: is the scan still working?"
        );
        assert!(unsafe_interpolations.is_empty(), "{unsafe_interpolations:#?}");
    }

    #[test]
    fn the_scan_sees_an_unsafe_interpolation() {
        let source = r#"format!("SELECT * FROM t WHERE name = '{name}'")"#;
        let format = literal(&source["format!(".len()..]).unwrap();
        assert_eq!(interpolations(format), vec!["name"]);
        assert_eq!(interpolations(r#"{{ "a": {A_B}, "b": {} }}"#), vec!["A_B", ""]);
    }
}

/// An array element type, as `construct_md_array` needs it.
pub struct ElementType {
    oid: pg_sys::Oid,
    len: i16,
    by_value: bool,
    align: std::ffi::c_char,
}

impl ElementType {
    pub fn of(oid: pg_sys::Oid) -> ElementType {
        let mut element = ElementType {
            oid,
            len: 0,
            by_value: false,
            align: 0,
        };
        // SAFETY: a built-in type; the out-parameters are ours.
        unsafe { pg_sys::get_typlenbyvalalign(oid, &mut element.len, &mut element.by_value, &mut element.align) };
        element
    }

    /// A one-dimensional array of `values` (`None`: a NULL element), copied into
    /// the current memory context. `buffers` hold the datums meanwhile, so that
    /// a caller building many arrays allocates them once.
    pub fn array_of(
        &self,
        values: impl IntoIterator<Item = Option<pg_sys::Datum>>,
        buffers: &mut ArrayBuffers,
    ) -> pg_sys::Datum {
        let ArrayBuffers { datums, nulls } = buffers;
        datums.clear();
        nulls.clear();
        for value in values {
            nulls.push(value.is_none());
            datums.push(value.unwrap_or(pg_sys::Datum::from(0)));
        }
        let (mut dims, mut lower_bounds) = ([datums.len() as i32], [1i32]);
        let nulls = if nulls.contains(&true) {
            nulls.as_mut_ptr()
        } else {
            std::ptr::null_mut()
        };
        // SAFETY: the datums are of this type, and `nulls` (if any) is as long as they are.
        let array = unsafe {
            pg_sys::construct_md_array(
                datums.as_mut_ptr(),
                nulls,
                1,
                dims.as_mut_ptr(),
                lower_bounds.as_mut_ptr(),
                self.oid,
                self.len as i32,
                self.by_value,
                self.align,
            )
        };
        pg_sys::Datum::from(array)
    }
}

/// Scratch space for `ElementType::array_of`.
#[derive(Default)]
pub struct ArrayBuffers {
    datums: Vec<pg_sys::Datum>,
    nulls: Vec<bool>,
}

/// A text datum of `text` in the current memory context.
pub fn text_datum(text: &str) -> pg_sys::Datum {
    // SAFETY: copies `text.len()` bytes from a live str.
    pg_sys::Datum::from(unsafe { pg_sys::cstring_to_text_with_len(text.as_ptr().cast(), text.len() as i32) })
}

/// A text[] of `values` (`None`: a NULL element) in the current memory context,
/// laid out as `construct_md_array` lays it out, in one allocation: without a
/// text datum allocated and copied per element (a run's audit arrays hold a
/// million record ids).
pub fn text_array<'a>(values: impl Iterator<Item = Option<&'a str>> + Clone) -> pg_sys::Datum {
    const HEADER: usize = 24; // ArrayType (16 bytes), then one dimension and its lower bound
    let int_align = |len: usize| (len + 3) & !3;
    let max_align = |len: usize| (len + 7) & !7;
    let (mut count, mut any_null, mut data_len) = (0usize, false, 0usize);
    for value in values.clone() {
        count += 1;
        match value {
            Some(text) => data_len += int_align(pg_sys::VARHDRSZ + text.len()),
            None => any_null = true,
        }
    }
    if count == 0 {
        // SAFETY: PostgreSQL's own empty array (no dimensions) of text.
        return pg_sys::Datum::from(unsafe { pg_sys::construct_empty_array(pg_sys::TEXTOID) });
    }
    let bitmap_len = if any_null { count.div_ceil(8) } else { 0 };
    let data_offset = max_align(HEADER + bitmap_len);
    let total = data_offset + data_len;
    // SAFETY: every write below is within the `total` bytes allocated (zeroed, so
    // padding and NULL bits are zero), at the offsets of PostgreSQL's array layout.
    unsafe {
        let array = pg_sys::palloc0(total).cast::<u8>();
        pgrx::set_varsize_4b(array.cast(), total as i32);
        let header = array.cast::<pg_sys::ArrayType>();
        (*header).ndim = 1;
        (*header).dataoffset = if any_null { data_offset as i32 } else { 0 };
        (*header).elemtype = pg_sys::TEXTOID;
        let dims = array.add(std::mem::size_of::<pg_sys::ArrayType>()).cast::<i32>();
        *dims = count as i32;
        *dims.add(1) = 1;
        let (bitmap, mut at) = (array.add(HEADER), data_offset);
        for (position, value) in values.enumerate() {
            let Some(text) = value else { continue };
            if any_null {
                *bitmap.add(position / 8) |= 1 << (position % 8);
            }
            let element = array.add(at);
            pgrx::set_varsize_4b(element.cast(), (pg_sys::VARHDRSZ + text.len()) as i32);
            std::ptr::copy_nonoverlapping(text.as_ptr(), element.add(pg_sys::VARHDRSZ), text.len());
            at += int_align(pg_sys::VARHDRSZ + text.len());
        }
        pg_sys::Datum::from(array)
    }
}
