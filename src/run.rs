//! Running a stream: its pending records through the meter processor, chunk by chunk.

use jiff::Timestamp;

use crate::catalog::Stream;
use crate::errors::Result;
use crate::gucs;
use crate::inbox;
use crate::processor::{Counts, Mode, Processor};

/// Meters every pending record of a batch stream, oldest first, in chunks of
/// `meter_ext.chunk_size`. Each chunk leaves the inbox in the transaction that
/// updates the meters.
pub fn process_pending(stream: &Stream, session_id: Option<i64>, now: Timestamp) -> Result<Counts> {
    let mut processor = Processor::new(stream, Mode::Apply, session_id, now)?;
    let mut counts = Counts::default();
    loop {
        let chunk = inbox::take_chunk(&stream.name, gucs::chunk_size())?;
        if chunk.is_empty() {
            return Ok(counts);
        }
        counts.add(Counts::of(&processor.process(&chunk)?));
    }
}
