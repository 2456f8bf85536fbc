//! Rows appended to a table as COPY appends them: each row's values set in a slot,
//! the slots written a page at a time (`table_multi_insert`: one WAL record per
//! page, not per row), then each row's index entries.
//!
//! A run claims one `meter.dedupe_keys` row per record. Through `INSERT … SELECT
//! … FROM unnest(…)` those claims were a third of a run, and a third of that was
//! the executor's work per row and a WAL record per heap row, not the index.
//!
//! Only a plain table without triggers, row security, CHECK constraints or
//! generated columns is appended to this way (`Appender::open` answers `None`
//! otherwise), and NOT NULL is checked here: nothing an INSERT would do besides
//! writing the row and its index entries is skipped.

use std::ffi::CStr;

use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode};

/// Rows per `table_multi_insert`, as COPY buffers them.
const ROWS_PER_WRITE: usize = 1000;

pub struct Appender {
    relation: pg_sys::Relation,
    estate: *mut pg_sys::EState,
    target: *mut pg_sys::ResultRelInfo,
    per_row: pg_sys::MemoryContext,
    command: pg_sys::CommandId,
    /// Each named column's attribute position.
    columns: Vec<usize>,
    /// Each named column's name where it is NOT NULL.
    not_null: Vec<Option<String>>,
    slots: Vec<*mut pg_sys::TupleTableSlot>,
    filled: usize,
}

impl Appender {
    /// Opens `table` to append rows of `columns` (every live column of it, in the
    /// order `push` gives their values), after the INSERT privilege check an
    /// INSERT would make. `None` when the table is not a plain one without
    /// triggers, row security, CHECK constraints or generated columns, or has a
    /// column not named: those take an INSERT.
    ///
    /// Nothing is undone if an ERROR ends the transaction meanwhile: the abort
    /// releases the relation, its locks and buffer pins, and the memory.
    pub fn open(table: pg_sys::Oid, columns: &[&str]) -> Option<Appender> {
        // SAFETY: the relation stays open (and locked) until `finish`; every
        // pointer read below is the relcache entry's or the executor state's.
        unsafe {
            let relation = pg_sys::table_open(table, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
            let class = &*(*relation).rd_rel;
            let constraints = (*(*relation).rd_att).constr;
            let plain = class.relkind == pg_sys::RELKIND_RELATION as std::ffi::c_char
                && (*relation).trigdesc.is_null()
                && !class.relrowsecurity
                && (constraints.is_null() || ((*constraints).num_check == 0 && !(*constraints).has_generated_stored));
            let positions = plain.then(|| positions_of((*relation).rd_att, columns)).flatten();
            let Some(positions) = positions else {
                pg_sys::table_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
                return None;
            };
            let allowed = pg_sys::pg_class_aclcheck(table, pg_sys::GetUserId(), pg_sys::ACL_INSERT as pg_sys::AclMode);
            if allowed != pg_sys::AclResult::ACLCHECK_OK {
                pg_sys::aclcheck_error(allowed, pg_sys::ObjectType::OBJECT_TABLE, class.relname.data.as_ptr());
            }
            let estate = pg_sys::CreateExecutorState();
            let target = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>()).cast::<pg_sys::ResultRelInfo>();
            (*target).type_ = pg_sys::NodeTag::T_ResultRelInfo;
            pg_sys::InitResultRelInfo(target, relation, 1, std::ptr::null_mut(), 0);
            pg_sys::ExecOpenIndices(target, false);
            let per_row = (*pg_sys::MakePerTupleExprContext(estate)).ecxt_per_tuple_memory;
            let not_null = positions
                .iter()
                .map(|&at| {
                    let attribute = &*(*(*relation).rd_att).attrs.as_ptr().add(at);
                    attribute.attnotnull.then(|| {
                        CStr::from_ptr(attribute.attname.data.as_ptr())
                            .to_string_lossy()
                            .into_owned()
                    })
                })
                .collect();
            Some(Appender {
                relation,
                estate,
                target,
                per_row,
                command: pg_sys::GetCurrentCommandId(true),
                columns: positions,
                not_null,
                slots: Vec::new(),
                filled: 0,
            })
        }
    }

    /// Appends a row: `values[i]` (`None`: NULL) for the `i`-th column named at
    /// `open`, each a datum of that column's type. Datums that are pointers need
    /// only live until the next `push` or `finish`, which copy them.
    pub fn push(&mut self, values: &[Option<pg_sys::Datum>]) {
        assert_eq!(values.len(), self.columns.len(), "a value for each column");
        for (value, not_null) in values.iter().zip(&self.not_null) {
            if let (None, Some(column)) = (value, not_null) {
                // SAFETY: the relation is open; its name is the relcache entry's.
                let table = unsafe { CStr::from_ptr((*(*self.relation).rd_rel).relname.data.as_ptr()) };
                ereport!(
                    ERROR,
                    PgSqlErrorCode::ERRCODE_NOT_NULL_VIOLATION,
                    format!(
                        "null value in column \"{column}\" of relation \"{}\" violates not-null constraint",
                        table.to_string_lossy()
                    )
                );
            }
        }
        if self.filled == self.slots.len() {
            // SAFETY: a slot for the open relation, in the executor state's memory
            // (the caller's context may be a chunk's, gone before `finish`).
            self.slots.push(unsafe {
                let caller = pg_sys::MemoryContextSwitchTo((*self.estate).es_query_cxt);
                let slot = pg_sys::table_slot_create(self.relation, std::ptr::null_mut());
                pg_sys::MemoryContextSwitchTo(caller);
                slot
            });
        }
        let slot = self.slots[self.filled];
        // SAFETY: the slot is cleared (new, or cleared after its last write) and
        // has one value and null flag per attribute of the relation.
        unsafe {
            let natts = (*(*slot).tts_tupleDescriptor).natts as usize;
            let datums = std::slice::from_raw_parts_mut((*slot).tts_values, natts);
            let nulls = std::slice::from_raw_parts_mut((*slot).tts_isnull, natts);
            nulls.fill(true);
            for (&at, value) in self.columns.iter().zip(values) {
                nulls[at] = value.is_none();
                datums[at] = value.unwrap_or(pg_sys::Datum::from(0));
            }
            pg_sys::ExecStoreVirtualTuple(slot);
        }
        self.filled += 1;
        if self.filled == ROWS_PER_WRITE {
            self.write();
        }
    }

    /// A text datum of `text` that lives until the row it is pushed in is written.
    pub fn text(&self, text: &str) -> pg_sys::Datum {
        self.in_row_memory(|| crate::sql::text_datum(text))
    }

    /// Runs `f` with PostgreSQL's allocations going to memory that lasts until the
    /// row pushed next is written: where a row's values are built.
    pub fn in_row_memory<R>(&self, f: impl FnOnce() -> R) -> R {
        // SAFETY: the per-row context is reset only after the rows pushed are
        // written; the caller's context is back before `f`'s result is.
        let caller = unsafe { pg_sys::MemoryContextSwitchTo(self.per_row) };
        let result = f();
        unsafe { pg_sys::MemoryContextSwitchTo(caller) };
        result
    }

    /// Writes the rows pushed since the last write, then their index entries (a
    /// duplicate key raises the unique violation an INSERT would).
    fn write(&mut self) {
        if self.filled == 0 {
            return;
        }
        // SAFETY: the filled slots hold virtual tuples of the relation; what the
        // heap and index code allocate goes to the per-row context, reset after.
        unsafe {
            let caller = pg_sys::MemoryContextSwitchTo(self.per_row);
            pg_sys::table_multi_insert(
                self.relation,
                self.slots.as_mut_ptr(),
                self.filled as i32,
                self.command,
                0,
                // No bulk-insert state: its ring of buffers would make this
                // backend write out the table's pages itself as it fills them.
                std::ptr::null_mut(),
            );
            for &slot in &self.slots[..self.filled] {
                let recheck = pg_sys::ExecInsertIndexTuples(
                    self.target,
                    slot,
                    self.estate,
                    false,
                    false,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                );
                pg_sys::list_free(recheck);
                pg_sys::ExecClearTuple(slot);
            }
            pg_sys::MemoryContextSwitchTo(caller);
            pg_sys::MemoryContextReset(self.per_row);
        }
        self.filled = 0;
    }

    /// Writes the rest and closes the table. The rows are visible to the
    /// statements that follow, as an INSERT's are.
    pub fn finish(mut self) {
        self.write();
        // SAFETY: everything here was made by `open` and `push`, and is let go once.
        unsafe {
            for &slot in &self.slots {
                pg_sys::ExecDropSingleTupleTableSlot(slot);
            }
            pg_sys::ExecCloseIndices(self.target);
            pg_sys::FreeExecutorState(self.estate);
            pg_sys::table_close(self.relation, pg_sys::NoLock as pg_sys::LOCKMODE);
            pg_sys::CommandCounterIncrement();
        }
    }
}

/// The attribute position of each of `columns`, when they are every live column
/// of `descriptor`.
///
/// # Safety
/// `descriptor` must be a valid tuple descriptor.
unsafe fn positions_of(descriptor: pg_sys::TupleDesc, columns: &[&str]) -> Option<Vec<usize>> {
    let attributes = std::slice::from_raw_parts((*descriptor).attrs.as_ptr(), (*descriptor).natts as usize);
    let live = attributes.iter().filter(|a| !a.attisdropped).count();
    let positions = column_positions(descriptor, columns)?;
    (positions.len() == live).then_some(positions)
}

/// The attribute position of each of `columns` in `descriptor` (its live
/// columns, by name: their order, and any dropped column, are the catalog's);
/// `None` when one is missing.
///
/// # Safety
/// `descriptor` must be a valid tuple descriptor.
pub(crate) unsafe fn column_positions(descriptor: pg_sys::TupleDesc, columns: &[&str]) -> Option<Vec<usize>> {
    let attributes = std::slice::from_raw_parts((*descriptor).attrs.as_ptr(), (*descriptor).natts as usize);
    columns
        .iter()
        .map(|name| {
            attributes
                .iter()
                .position(|a| !a.attisdropped && CStr::from_ptr(a.attname.data.as_ptr()).to_bytes() == name.as_bytes())
        })
        .collect()
}
