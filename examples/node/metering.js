// meter_ext from Node.js with node-postgres: send usage, run the stream, follow
// the run on LISTEN (meter_session_status, meter_flushed), then consume the
// flushed meter records from the outbox and acknowledge them.
//
//     npm ci --prefix examples/node
//     PGHOST=localhost PGPORT=28815 PGUSER=postgres PGDATABASE=meter_demo node examples/node/metering.js
//
// Connection settings come from the standard PG* environment variables. The
// example creates (and on a rerun recreates) its own meter type, stream and
// consumer, all named node-example*.
'use strict';

const { Client } = require('pg');

const STREAM = 'node-example';
const METER_TYPE = 'node-example-calls';
const CONSUMER = 'node-example-billing';

const RECORDS = [
  { id: 'e1', userId: 'acme', value: 120, region: 'eu' },
  { id: 'e2', userId: 'acme', value: 80, region: 'us' },
  { id: 'e3', userId: 'globex', value: 15, region: 'eu' },
  { id: 'e1', userId: 'acme', value: 120, region: 'eu' }, // a retry: counted once
  { id: 'e4', value: 7, region: 'eu' }, // no userId: rejected, kept in meter.rejected
];

async function setup(db) {
  await db.query('SELECT meter.drop_stream(name, cascade => true) FROM meter.streams WHERE name = $1', [STREAM]);
  await db.query('SELECT meter.drop_meter_type(name) FROM meter.meter_types WHERE name = $1', [METER_TYPE]);
  await db.query(
    "SELECT meter.create_meter_type($1, 'sum', '@monthly', 'Europe/Stockholm', unit => 'calls')",
    [METER_TYPE],
  );
  const rules = [{ name: 'all', meter_type: METER_TYPE, group_by: ['region'] }];
  // flush_by stream_execution: every run flushes its meters, so the example sees records.
  await db.query(
    "SELECT meter.create_stream($1, $2::jsonb, flush_by => 'stream_execution')",
    [STREAM, JSON.stringify(rules)],
  );
  for (const user of ['acme', 'globex']) {
    await db.query('SELECT meter.create_meter($1, $2, $3)', [STREAM, METER_TYPE, user]);
  }
  await db.query('SELECT meter.register_consumer($1, $2)', [CONSUMER, STREAM]);
}

// Notifications, in arrival order; `next` waits for the one that ends a wait.
function follow(listener) {
  const flushIds = [];
  let waiting = null;
  listener.on('notification', (note) => {
    const event = JSON.parse(note.payload);
    if (note.channel === 'meter_flushed') {
      if (event.flushIds) {
        // One doorbell for a chunk (queue pressure, or past meter_ext.notify_record_limit
        // records in one transaction): its records are in the outbox.
        const [first, last] = event.flushIds;
        for (let id = first; id <= last; id += 1) flushIds.push(id);
        console.log(`  meter_flushed: flushes ${first} to ${last}`);
      } else if (event.truncated) {
        // Too long for NOTIFY: the record is in the outbox.
        flushIds.push(event.flushId);
        console.log(`  meter_flushed: flush ${event.flushId}, meter ${event.meterId}`);
      } else {
        flushIds.push(event.flushId);
        console.log(`  meter_flushed: flush ${event.flushId}, meter ${event.id} of ${event.userId}`);
      }
    } else if (event.streamName === STREAM) {
      console.log(`  meter_session_status: ${event.sessionPreviousStatus} -> ${event.sessionStatus}`);
      if (waiting && waiting.status === event.sessionStatus) {
        waiting.resolve();
      }
    }
  });
  return {
    flushIds,
    until(status) {
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no ${status} within 10 s`)), 10000);
        waiting = { status, resolve: () => { clearTimeout(timer); resolve(); } };
      });
    },
  };
}

async function main() {
  const db = new Client();
  const listener = new Client();
  await db.connect();
  await listener.connect();
  try {
    await setup(db);
    await listener.query('LISTEN meter_session_status');
    await listener.query('LISTEN meter_flushed');
    const events = follow(listener);

    const { rows: [counts] } = await db.query(
      'SELECT accepted, duplicates, rejected FROM meter.ingest($1, $2::jsonb)',
      [STREAM, JSON.stringify(RECORDS)],
    );
    console.log(`ingest: ${counts.accepted} accepted, ${counts.duplicates} duplicate, ${counts.rejected} rejected`);

    console.log('CALL meter.execute_stream:');
    const pushed = events.until('PUSH_COMPLETED');
    await db.query('CALL meter.execute_stream($1)', [STREAM]);
    await pushed;

    console.log('read_flushed:');
    const { rows } = await db.query('SELECT flush_id, record FROM meter.read_flushed($1, 100)', [CONSUMER]);
    for (const { flush_id: flushId, record } of rows) {
      const groups = record.groups.map((g) => `${g.key}: ${g.value}`).join(', ');
      console.log(`  ${flushId}: ${record.userId} ${record.value} ${record.unit} (${groups})`);
    }
    console.log('ack_flushed:');
    const completed = events.until('COMPLETED');
    await db.query('SELECT meter.ack_flushed($1, $2)', [CONSUMER, rows[rows.length - 1].flush_id]);
    await completed;

    const outbox = rows.map((r) => String(r.flush_id));
    if (events.flushIds.map(String).sort().join() !== outbox.join()) {
      throw new Error(`the doorbell rang for ${events.flushIds}, the outbox has ${outbox}`);
    }
  } finally {
    await db.end();
    await listener.end();
  }
}

main().catch((error) => {
  console.error(error.message);
  process.exit(1);
});
