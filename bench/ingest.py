#!/usr/bin/env python3
"""Times getting the same JSON records into PostgreSQL two ways, from one client
(psycopg 3), the way an application sends them:

  copy    COPY of one record per line into bench.copy_target (COPY protocol);
  ingest  meter.ingest(stream, array) per BATCH records, a prepared statement with
          the array bound as a parameter, each call its own transaction.

    ingest.py PORT FILE copy|ingest [STREAM BATCH]

FILE holds one JSON record per line. Prints the seconds the transfer took
(connecting and reading the file excluded) and, for ingest, the records accepted.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / ".examples" / "python"))
import psycopg  # noqa: E402

port, path, mode = sys.argv[1], sys.argv[2], sys.argv[3]
with psycopg.connect(f"host=localhost port={port} user=postgres dbname=bench", autocommit=True) as db:
    if mode == "copy":
        data = Path(path).read_bytes()
        started = time.perf_counter()
        with db.cursor() as cursor, cursor.copy("COPY bench.copy_target (record) FROM STDIN") as copy:
            for at in range(0, len(data), 1 << 20):
                copy.write(data[at : at + (1 << 20)])
        print(f"{time.perf_counter() - started:.3f}")
    else:
        stream, batch = sys.argv[4], int(sys.argv[5])
        lines = Path(path).read_text().splitlines()
        arrays = ["[" + ",".join(lines[at : at + batch]) + "]" for at in range(0, len(lines), batch)]
        accepted = 0
        started = time.perf_counter()
        for array in arrays:
            row = db.execute("SELECT accepted FROM meter.ingest(%s, %s::jsonb)", (stream, array), prepare=True).fetchone()
            accepted += row[0]
        print(f"{time.perf_counter() - started:.3f} {accepted}")
