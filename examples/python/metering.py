"""meter_ext from Python with psycopg 3: send usage, run the stream, follow the
run on LISTEN (meter_session_status, meter_flushed), then consume the flushed
meter records from the outbox and acknowledge them.

    pip install "psycopg[binary]"
    PGHOST=localhost PGPORT=28815 PGUSER=postgres PGDATABASE=meter_demo python3 examples/python/metering.py

Connection settings come from the standard PG* environment variables. The
example creates (and on a rerun recreates) its own meter type, stream and
consumer, all named python-example*.
"""

import json
import sys

import psycopg
from psycopg.types.json import Jsonb

STREAM = "python-example"
METER_TYPE = "python-example-calls"
CONSUMER = "python-example-billing"

RECORDS = [
    {"id": "e1", "userId": "acme", "value": 120, "region": "eu"},
    {"id": "e2", "userId": "acme", "value": 80, "region": "us"},
    {"id": "e3", "userId": "globex", "value": 15, "region": "eu"},
    {"id": "e1", "userId": "acme", "value": 120, "region": "eu"},  # a retry: counted once
    {"id": "e4", "value": 7, "region": "eu"},  # no userId: rejected, kept in meter.rejected
]


def setup(db):
    db.execute("SELECT meter.drop_stream(name, cascade => true) FROM meter.streams WHERE name = %s", (STREAM,))
    db.execute("SELECT meter.drop_meter_type(name) FROM meter.meter_types WHERE name = %s", (METER_TYPE,))
    db.execute(
        "SELECT meter.create_meter_type(%s, 'sum', '@monthly', 'Europe/Stockholm', unit => 'calls')", (METER_TYPE,)
    )
    rules = [{"name": "all", "meter_type": METER_TYPE, "group_by": ["region"]}]
    # flush_by stream_execution: every run flushes its meters, so the example sees records.
    db.execute(
        "SELECT meter.create_stream(%s, %s, flush_by => 'stream_execution')", (STREAM, Jsonb(rules))
    )
    for user in ("acme", "globex"):
        db.execute("SELECT meter.create_meter(%s, %s, %s)", (STREAM, METER_TYPE, user))
    db.execute("SELECT meter.register_consumer(%s, %s)", (CONSUMER, STREAM))


def drain(listener, until_status=None):
    """Prints the notifications that arrive, until `until_status` (or a quiet second)."""
    flush_ids = []
    for note in listener.notifies(timeout=1 if until_status is None else 10):
        event = json.loads(note.payload)
        if note.channel == "meter_flushed":
            if "flushIds" in event:
                # One doorbell for a chunk (queue pressure, or past meter_ext.notify_record_limit
                # records in one transaction): its records are in the outbox.
                first, last = event["flushIds"]
                flush_ids.extend(range(first, last + 1))
                print(f"  meter_flushed: flushes {first} to {last}")
            elif event.get("truncated"):
                # Too long for NOTIFY: the record is in the outbox.
                flush_ids.append(event["flushId"])
                print(f"  meter_flushed: flush {event['flushId']}, meter {event['meterId']}")
            else:
                flush_ids.append(event["flushId"])
                print(f"  meter_flushed: flush {event['flushId']}, meter {event['id']} of {event['userId']}")
        elif event["streamName"] == STREAM:
            print(f"  meter_session_status: {event['sessionPreviousStatus']} -> {event['sessionStatus']}")
            if event["sessionStatus"] == until_status:
                break
    return flush_ids


def main():
    with psycopg.connect(autocommit=True) as db, psycopg.connect(autocommit=True) as listener:
        setup(db)
        listener.execute("LISTEN meter_session_status")
        listener.execute("LISTEN meter_flushed")

        accepted, duplicates, rejected = db.execute(
            "SELECT accepted, duplicates, rejected FROM meter.ingest(%s, %s)", (STREAM, Jsonb(RECORDS))
        ).fetchone()
        print(f"ingest: {accepted} accepted, {duplicates} duplicate, {rejected} rejected")

        print("CALL meter.execute_stream:")
        db.execute("CALL meter.execute_stream(%s)", (STREAM,))
        rung = drain(listener)

        print("read_flushed:")
        rows = db.execute("SELECT flush_id, record FROM meter.read_flushed(%s, 100)", (CONSUMER,)).fetchall()
        for flush_id, record in rows:
            groups = ", ".join(f"{g['key']}: {g['value']}" for g in record["groups"])
            print(f"  {flush_id}: {record['userId']} {record['value']} {record['unit']} ({groups})")
        print("ack_flushed:")
        db.execute("SELECT meter.ack_flushed(%s, %s)", (CONSUMER, rows[-1][0]))
        drain(listener, until_status="COMPLETED")

        if sorted(rung) != [flush_id for flush_id, _ in rows]:
            sys.exit(f"the doorbell rang for {rung}, the outbox has {[f for f, _ in rows]}")


if __name__ == "__main__":
    main()
