//! The client examples in examples/ (Python with psycopg 3, Node.js with
//! node-postgres), run as a user would, each against a fresh database: they must
//! print exactly what the README shows. `make test` installs their dependencies
//! (scripts/examples-setup.sh).

use std::path::Path;
use std::process::Command;

use crate::support::{fresh_database, port};

/// What both examples print against a fresh database (README: "From a client").
const EXPECTED: &str = "\
ingest: 3 accepted, 1 duplicate, 1 rejected
CALL meter.execute_stream:
  meter_session_status: NEVER_RUN -> INITIALIZING
  meter_session_status: INITIALIZING -> RUNNING
  meter_session_status: RUNNING -> USAGE_PUSHING
  meter_flushed: flush 1, meter 1 of acme
  meter_flushed: flush 2, meter 2 of globex
  meter_session_status: USAGE_PUSHING -> PUSH_COMPLETED
read_flushed:
  1: acme 200 calls (region=eu: 120, region=us: 80)
  2: globex 15 calls (region=eu: 15)
ack_flushed:
  meter_session_status: PUSH_COMPLETED -> CONSUME_COMPLETED
  meter_session_status: CONSUME_COMPLETED -> COMPLETED
";

fn run_example(database: &str, program: &str, script: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        root.join(".examples/python").is_dir() && root.join("examples/node/node_modules/pg").is_dir(),
        "the examples' dependencies are missing: run scripts/examples-setup.sh (make test does)"
    );
    let output = Command::new(program)
        .arg(root.join(script))
        .env("PYTHONPATH", root.join(".examples/python"))
        .env("PGHOST", "localhost")
        .env("PGPORT", port().to_string())
        .env("PGUSER", "postgres")
        .env("PGDATABASE", database)
        .output()
        .unwrap_or_else(|e| panic!("running {program} {script}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{script} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn the_python_example_prints_what_the_readme_shows() {
    drop(fresh_database("it_example_python"));
    let stdout = run_example("it_example_python", "python3", "examples/python/metering.py");
    assert_eq!(stdout, EXPECTED);
    // Run again: it recreates what it made and gives the same story.
    let again = run_example("it_example_python", "python3", "examples/python/metering.py");
    assert_eq!(again.lines().count(), EXPECTED.lines().count(), "{again}");
}

#[test]
fn the_node_example_prints_what_the_readme_shows() {
    drop(fresh_database("it_example_node"));
    let stdout = run_example("it_example_node", "node", "examples/node/metering.js");
    assert_eq!(stdout, EXPECTED);
}

#[test]
fn the_readme_shows_the_examples_output() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    assert!(
        readme.contains(EXPECTED),
        "README.md does not show the examples' output verbatim"
    );
}
