//! Small SPI helpers shared by the Postgres-facing modules.

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::{FromDatum, IntoDatum};

use crate::errors::Result;

/// The first column of the first row, or `None` when there is no row (or it is NULL).
pub fn one<T: FromDatum + IntoDatum>(query: &str, args: &[DatumWithOid]) -> Result<Option<T>> {
    Spi::connect_mut(|client| {
        let table = client.update(query, Some(1), args)?;
        if table.is_empty() {
            return Ok(None);
        }
        Ok(table.first().get_one::<T>()?)
    })
}

/// Runs a statement and returns how many rows it touched.
pub fn execute(query: &str, args: &[DatumWithOid]) -> Result<usize> {
    Spi::connect_mut(|client| Ok(client.update(query, None, args)?.len()))
}

/// The first column of every row, as text.
pub fn strings(query: &str, args: &[DatumWithOid]) -> Result<Vec<String>> {
    Spi::connect_mut(|client| {
        let table = client.update(query, None, args)?;
        let mut out = Vec::with_capacity(table.len());
        for row in table {
            if let Some(s) = row.get::<String>(1)? {
                out.push(s);
            }
        }
        Ok(out)
    })
}
