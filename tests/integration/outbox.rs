//! The outbox seen from outside: the meter_flushed doorbell matches the outbox
//! rows (a record too big for NOTIFY comes as a pointer), consumers resume after a
//! disconnect without skipping, and CONSUME_COMPLETED waits for the last consumer.

use std::time::Duration;

use postgres::Client;
use serde_json::{json, Value};

use crate::support::{connect, fresh_database, Listener};

/// A stream grouping by endpoint; `big` gets 500 groups (its record is > 8000 bytes).
fn setup(db: &mut Client) {
    db.batch_execute(
        r#"SELECT meter.create_meter_type('calls', 'sum', '@daily');
           SELECT meter.create_stream('s', '[{"name": "all", "meter_type": "calls", "group_by": ["endpoint"]}]',
                                      auto_create_meters => true);
           INSERT INTO meter.usage (stream, record)
           SELECT 's', jsonb_build_object('userId', 'big', 'value', 1, 'endpoint', '/api/v1/resource/' || i)
             FROM generate_series(1, 500) i;
           INSERT INTO meter.usage (stream, record)
           SELECT 's', jsonb_build_object('userId', 'user-' || i, 'value', i, 'endpoint', '/x')
             FROM generate_series(1, 20) i;
           SELECT meter.run_stream('s');"#,
    )
    .unwrap();
}

/// Ends every meter's period, so the next run flushes them all.
fn expire_all(db: &mut Client) {
    db.batch_execute(
        "UPDATE meter.meters SET period_start = now() - interval '2 days', period_end = now() - interval '1 day'",
    )
    .unwrap();
}

#[test]
fn doorbell_payloads_equal_the_outbox_rows() {
    let mut db = fresh_database("it_outbox_doorbell");
    setup(&mut db);
    expire_all(&mut db);
    let mut listener = Listener::new("it_outbox_doorbell", &["meter_flushed"]);
    db.query_one("SELECT meter.run_stream('s')", &[]).unwrap();
    let payloads = listener.until(|p| p.len() == 21, Duration::from_secs(20));
    assert_eq!(payloads.len(), 21);
    let outbox: Vec<(i64, i64, Value)> = db
        .query("SELECT id, meter_id, record FROM meter.flushed ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(outbox.len(), 21);
    for ((_, payload), (flush_id, meter_id, record)) in payloads.iter().zip(&outbox) {
        if record.to_string().len() >= 8000 {
            assert_eq!(
                payload,
                &json!({"flushId": flush_id, "meterId": meter_id, "truncated": true})
            );
            assert_eq!(
                record["groups"].as_array().unwrap().len(),
                500,
                "the outbox holds it whole"
            );
        } else {
            let mut expected = record.clone();
            expected["flushId"] = json!(flush_id);
            assert_eq!(payload, &expected);
        }
    }
    assert!(payloads.iter().any(|(_, p)| p["truncated"] == json!(true)));
}

#[test]
fn a_consumer_resumes_after_its_last_ack_and_skips_nothing() {
    let mut db = fresh_database("it_outbox_consumer");
    setup(&mut db);
    db.batch_execute("SELECT meter.register_consumer('billing', 's')")
        .unwrap();
    expire_all(&mut db);
    db.query_one("SELECT meter.run_stream('s')", &[]).unwrap();
    let all: Vec<i64> = db
        .query("SELECT id FROM meter.flushed ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(all.len(), 21);

    // First connection: reads 8, processes and acks 5, then goes away.
    let mut first = connect("it_outbox_consumer");
    let read: Vec<i64> = first
        .query("SELECT flush_id FROM meter.read_flushed('billing', 8)", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(read, all[..8]);
    first
        .query_one("SELECT meter.ack_flushed('billing', $1)", &[&read[4]])
        .unwrap();
    drop(first);

    // Second connection: gets everything after the last ack, in order, then acks it all.
    let mut second = connect("it_outbox_consumer");
    let mut seen = Vec::new();
    loop {
        let batch: Vec<i64> = second
            .query("SELECT flush_id FROM meter.read_flushed('billing', 4)", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let Some(last) = batch.last() else { break };
        second
            .query_one("SELECT meter.ack_flushed('billing', $1)", &[last])
            .unwrap();
        seen.extend(batch);
    }
    assert_eq!(seen, all[5..]);
}

#[test]
fn consume_completed_arrives_when_the_second_consumer_acks() {
    let mut db = fresh_database("it_outbox_consumed");
    setup(&mut db);
    db.batch_execute(
        "SELECT meter.register_consumer('billing', 's');
         SELECT meter.register_consumer('warehouse', 's');",
    )
    .unwrap();
    expire_all(&mut db);
    let mut listener = Listener::new("it_outbox_consumed", &["meter_session_status"]);
    let session: i64 = db
        .query_one("SELECT id FROM meter.run_stream('s')", &[])
        .unwrap()
        .get(0);
    let events = listener.until(|e| e.len() == 4, Duration::from_secs(10));
    assert_eq!(events.last().unwrap().1["sessionStatus"], "PUSH_COMPLETED");
    let last: i64 = db
        .query_one("SELECT max(id) FROM meter.flushed WHERE session_id = $1", &[&session])
        .unwrap()
        .get(0);
    db.query_one("SELECT meter.ack_flushed('billing', $1)", &[&last])
        .unwrap();
    assert!(
        listener.until(|_| false, Duration::from_millis(500)).is_empty(),
        "one consumer is not enough"
    );
    db.query_one("SELECT meter.ack_flushed('warehouse', $1)", &[&last])
        .unwrap();
    let events = listener.until(|e| e.len() == 2, Duration::from_secs(10));
    let statuses: Vec<&str> = events
        .iter()
        .map(|(_, p)| p["sessionStatus"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["CONSUME_COMPLETED", "COMPLETED"]);
}

/// Under NOTIFY queue pressure (at or above `meter_ext.notify_queue_limit` percent
/// in use; 0 forces it here) a flush rings the doorbell once per chunk with the
/// range of flush ids, and the outbox still holds every record.
#[test]
fn under_queue_pressure_the_doorbell_rings_once_per_chunk_and_nothing_is_lost() {
    let mut db = fresh_database("it_outbox_pressure");
    setup(&mut db);
    expire_all(&mut db);
    let mut listener = Listener::new("it_outbox_pressure", &["meter_flushed"]);
    db.batch_execute("SET meter_ext.notify_queue_limit = 0; SET meter_ext.chunk_size = 8")
        .unwrap();
    db.query_one("SELECT meter.run_stream('s')", &[]).unwrap();
    let payloads = listener.until(|p| p.len() >= 3, Duration::from_secs(20));
    let ids: Vec<i64> = db
        .query("SELECT id FROM meter.flushed ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids.len(), 21, "every flushed meter is in the outbox");
    // 21 meters in chunks of 8: three doorbells covering every flush id, in order.
    let covered: Vec<(i64, i64, i64)> = payloads
        .iter()
        .map(|(_, p)| {
            assert_eq!(p["queuePressure"], json!(true), "{p}");
            let range = p["flushIds"].as_array().unwrap();
            (
                range[0].as_i64().unwrap(),
                range[1].as_i64().unwrap(),
                p["count"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(covered.len(), 3, "{payloads:?}");
    assert_eq!(covered.iter().map(|c| c.2).sum::<i64>(), 21);
    assert_eq!(covered[0].0, ids[0]);
    assert_eq!(covered[2].1, ids[20]);
    assert!(covered.windows(2).all(|w| w[0].1 < w[1].0));
}

/// Past `meter_ext.notify_record_limit` records announced one by one in a
/// transaction, each further chunk rings once with its range (PostgreSQL holds a
/// transaction's notifications in memory until it commits). The count starts again
/// with each transaction.
#[test]
fn past_the_record_limit_a_transaction_rings_once_per_chunk() {
    let mut db = fresh_database("it_outbox_record_limit");
    setup(&mut db);
    let mut listener = Listener::new("it_outbox_record_limit", &["meter_flushed"]);
    db.batch_execute("SET meter_ext.notify_record_limit = 10; SET meter_ext.chunk_size = 8")
        .unwrap();
    for run in 0..2 {
        expire_all(&mut db);
        let after: i64 = db
            .query_one("SELECT coalesce(max(id), 0) FROM meter.flushed", &[])
            .unwrap()
            .get(0);
        db.query_one("SELECT meter.run_stream('s')", &[]).unwrap();
        let ids: Vec<i64> = db
            .query("SELECT id FROM meter.flushed WHERE id > $1 ORDER BY id", &[&after])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(ids.len(), 21, "run {run}: every flushed meter is in the outbox");
        // 21 meters in chunks of 8: the first chunk's 8 records one by one (8 ≤ 10),
        // then the chunks of 8 and 5 once each (16 and 13 would pass 10).
        let payloads = listener.until(|p| p.len() == 10, Duration::from_secs(20));
        let one_by_one: Vec<i64> = payloads[..8]
            .iter()
            .map(|(_, p)| p["flushId"].as_i64().unwrap())
            .collect();
        assert_eq!(one_by_one, ids[..8], "run {run}");
        let summaries: Vec<&Value> = payloads[8..].iter().map(|(_, p)| p).collect();
        assert_eq!(
            summaries,
            [
                &json!({"count": 8, "flushIds": [ids[8], ids[15]], "recordLimit": true}),
                &json!({"count": 5, "flushIds": [ids[16], ids[20]], "recordLimit": true}),
            ],
            "run {run}"
        );
    }
}
