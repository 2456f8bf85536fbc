//! Upgrades (SPEC §10): a database created at the first released version (0.1.0)
//! keeps its data through `ALTER EXTENSION meter_ext UPDATE`, and ends with exactly
//! the schema a fresh install of the current version has.

use postgres::Client;

use crate::support::{fresh_database_at, unverified_meters};

const FIRST_RELEASE: &str = "0.1.0";

/// The user data a version change must keep, one line per row, sorted.
fn data_of(db: &mut Client) -> Vec<String> {
    db.query(
        "SELECT row(m.user_id, m.value, m.groups, m.period_end)::text FROM meter.meters m
         UNION ALL SELECT row(s.status, s.records_metered)::text FROM meter.sessions s
         UNION ALL SELECT row(r.code, r.record)::text FROM meter.rejected r
         UNION ALL SELECT row(u.stream, u.record)::text FROM meter.usage u
         ORDER BY 1",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Everything a user's SQL can see of the extension, one line per object, sorted.
fn schema_of(db: &mut Client) -> Vec<String> {
    let query = "
        SELECT 'function ' || p.oid::regprocedure || ' -> ' || coalesce(pg_get_function_result(p.oid), '(procedure)')
               || ' ' || p.prokind::text || ' ' || p.provolatile::text || ' secdef=' || p.prosecdef
               || ' config=' || coalesce(p.proconfig::text, '') || ' acl=' || coalesce(p.proacl::text, '')
               || ' args=' || coalesce(pg_get_function_arguments(p.oid), '')
               || ' body=' || md5(coalesce(p.prosrc, '') || coalesce(pg_get_function_sqlbody(p.oid), ''))
          FROM pg_proc p WHERE p.pronamespace = 'meter'::regnamespace
        UNION ALL
        SELECT c.relkind::text || ' ' || c.relname || ' acl=' || coalesce(c.relacl::text, '') || ' options='
               || coalesce(c.reloptions::text, '')
          FROM pg_class c WHERE c.relnamespace = 'meter'::regnamespace
        UNION ALL
        SELECT 'column ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
               || ' notnull=' || a.attnotnull || ' default=' || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
               || ' collation=' || coalesce(nullif(a.attcollation, 0)::regcollation::text, '')
               || ' compression=' || a.attcompression::text || ' generated=' || a.attgenerated::text
          FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE c.relnamespace = 'meter'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
        UNION ALL
        SELECT 'index ' || pg_get_indexdef(i.indexrelid)
          FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid WHERE c.relnamespace = 'meter'::regnamespace
        UNION ALL
        SELECT 'constraint ' || conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
          FROM pg_constraint WHERE connamespace = 'meter'::regnamespace
        UNION ALL
        SELECT 'view ' || c.relname || ' ' || md5(pg_get_viewdef(c.oid))
          FROM pg_class c WHERE c.relnamespace = 'meter'::regnamespace AND c.relkind = 'v'
        UNION ALL
        SELECT 'type ' || t.typname FROM pg_type t WHERE t.typnamespace = 'meter'::regnamespace
        ORDER BY 1";
    db.query(query, &[])
        .unwrap()
        .iter()
        .map(|r| {
            r.get::<_, Option<String>>(0)
                .unwrap_or_else(|| "(a NULL line: the query misses a coalesce)".into())
        })
        .collect()
}

#[test]
fn data_made_at_the_first_release_survives_the_update() {
    let mut db = fresh_database_at("it_upgrade_data", Some(FIRST_RELEASE));
    db.batch_execute(
        r#"SELECT meter.create_meter_type('calls', 'sum', '@monthly', 'Europe/Paris', unit => 'calls');
           SELECT meter.create_stream('api', '[{"name": "all", "meter_type": "calls", "group_by": ["region"]}]',
                                      auto_create_meters => true);
           SELECT meter.register_consumer('billing', 'api');
           SELECT meter.ingest('api', '[{"userId": "acme", "value": 2, "region": "eu", "id": "a"},
                                       {"userId": "acme", "value": "0.5", "region": "us", "id": "b"},
                                       {"userId": "zeta", "value": "oops"}]');
           SELECT meter.run_stream('api');
           SELECT meter.ingest('api', '{"userId": "acme", "value": 1, "region": "eu", "id": "c"}');"#,
    )
    .unwrap();
    let before = data_of(&mut db);
    assert_eq!(before.len(), 5, "{before:?}");

    db.batch_execute("ALTER EXTENSION meter_ext UPDATE").unwrap();
    let version: String = db
        .query_one("SELECT extversion FROM pg_extension WHERE extname = 'meter_ext'", &[])
        .unwrap()
        .get(0);
    let current: String = db
        .query_one(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'meter_ext'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(version, current);
    assert_ne!(version, FIRST_RELEASE, "the test must cross a version boundary");

    let after = data_of(&mut db);
    assert_eq!(after, before);
    // The stream's inbox partition, made at 0.1.0, is now like a new one: it counts
    // its rows' records and compresses them as its parent does.
    let partition: (i32, String) = db
        .query_one(
            "SELECT (SELECT sum(records)::int FROM meter.usage),
                    string_agg(a.attname || '=' || a.attcompression::text || a.attgenerated::text, ' ' ORDER BY a.attname)
               FROM pg_inherits i JOIN pg_attribute a ON a.attrelid = i.inhrelid
              WHERE i.inhparent = 'meter.usage'::regclass AND a.attname IN ('record', 'records')
                AND (a.attname, a.attcompression) IN (SELECT attname, attcompression FROM pg_attribute
                                                       WHERE attrelid = 'meter.usage'::regclass)",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(partition, (1, "record=l records=s".to_string()));

    // The updated extension goes on working on the old data: the pending record is
    // metered, a duplicate of a pre-upgrade id still counts once, the audit agrees.
    db.batch_execute(
        r#"SELECT meter.ingest('api', '{"userId": "acme", "value": 100, "region": "eu", "id": "a"}');
           SELECT meter.run_stream('api');"#,
    )
    .unwrap();
    let value: String = db
        .query_one("SELECT value::text FROM meter.meters WHERE user_id = 'acme'", &[])
        .unwrap()
        .get(0);
    assert_eq!(value, "3.5");
    assert_eq!(unverified_meters(&mut db), 0);
}

#[test]
fn an_updated_schema_equals_a_fresh_install() {
    let mut updated = fresh_database_at("it_upgrade_schema_old", Some(FIRST_RELEASE));
    updated.batch_execute("ALTER EXTENSION meter_ext UPDATE").unwrap();
    let mut fresh = fresh_database_at("it_upgrade_schema_new", None);
    let (updated, fresh) = (schema_of(&mut updated), schema_of(&mut fresh));
    assert!(fresh.len() > 100, "the comparison must see the schema: {}", fresh.len());
    let missing: Vec<&String> = fresh.iter().filter(|l| !updated.contains(l)).collect();
    let extra: Vec<&String> = updated.iter().filter(|l| !fresh.contains(l)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "the update script misses {missing:#?}\nand leaves {extra:#?}"
    );
}

/// Stream `api` whose consumer `billing` every run with a flush waits for, and a
/// daily meter of acme.
fn stream_with_a_consumer(db: &mut Client) {
    db.batch_execute(
        r#"SELECT meter.create_meter_type('calls', 'sum', '@daily');
           SELECT meter.create_stream('api', '[{"name": "all", "meter_type": "calls"}]');
           SELECT meter.register_consumer('billing', 'api');
           SELECT meter.create_meter('api', 'calls', 'acme');"#,
    )
    .unwrap();
}

/// Ends acme's period and runs the stream, which flushes it. Returns the last
/// session's status, its `last_flush_id` (read so that a 0.1.0 schema, without
/// the column, answers NULL) and the newest flush id.
fn run_with_a_flush(db: &mut Client) -> (String, Option<i64>, i64) {
    db.batch_execute(
        "UPDATE meter.meters SET period_start = now() - interval '2 days', period_end = now() - interval '1 day';
         SELECT meter.run_stream('api');",
    )
    .unwrap();
    last_session(db)
}

fn last_session(db: &mut Client) -> (String, Option<i64>, i64) {
    let row = db
        .query_one(
            "SELECT s.status, (pg_catalog.to_jsonb(s) ->> 'last_flush_id')::bigint,
                    (SELECT max(id) FROM meter.flushed)
               FROM meter.sessions s ORDER BY s.id DESC LIMIT 1",
            &[],
        )
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

fn ack_all(db: &mut Client) {
    db.batch_execute("SELECT meter.ack_flushed('billing', (SELECT max(id) FROM meter.flushed))")
        .unwrap();
}

#[test]
fn a_run_waiting_for_its_consumer_across_the_update_settles() {
    let mut db = fresh_database_at("it_upgrade_settle", Some(FIRST_RELEASE));
    stream_with_a_consumer(&mut db);
    // This library flushes at 0.1.0, where meter.sessions has no last_flush_id.
    assert_eq!(run_with_a_flush(&mut db).0, "PUSH_COMPLETED");

    db.batch_execute("ALTER EXTENSION meter_ext UPDATE").unwrap();
    let (status, recorded, _) = last_session(&mut db);
    assert_eq!(
        (status.as_str(), recorded),
        ("PUSH_COMPLETED", None),
        "flushed before the column existed"
    );
    // Settled by reading the outbox.
    ack_all(&mut db);
    assert_eq!(last_session(&mut db).0, "COMPLETED");

    // A run after the update records its newest flush id, and settles by it.
    let (status, recorded, flushed) = run_with_a_flush(&mut db);
    assert_eq!((status.as_str(), recorded), ("PUSH_COMPLETED", Some(flushed)));
    ack_all(&mut db);
    assert_eq!(last_session(&mut db).0, "COMPLETED");
}

/// A backend remembers that its installation has `last_flush_id`; one that saw it,
/// then meets a 0.1.0 installation made anew in the same database, asks again.
#[test]
fn a_backend_that_saw_the_new_schema_runs_on_an_old_one_installed_after() {
    let mut db = fresh_database_at("it_upgrade_reinstall", None);
    stream_with_a_consumer(&mut db);
    let (status, recorded, flushed) = run_with_a_flush(&mut db);
    assert_eq!((status.as_str(), recorded), ("PUSH_COMPLETED", Some(flushed)));
    db.batch_execute(&format!(
        "DROP EXTENSION meter_ext CASCADE; CREATE EXTENSION meter_ext VERSION '{FIRST_RELEASE}'"
    ))
    .unwrap();
    stream_with_a_consumer(&mut db);
    assert_eq!(run_with_a_flush(&mut db).0, "PUSH_COMPLETED");
    ack_all(&mut db);
    assert_eq!(last_session(&mut db).0, "COMPLETED");
}
