//! Connections to the cluster scripts/integration.sh started.

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};

/// The database the cluster's pg_cron and background worker use
/// (`cron.database_name`, `meter_ext.database`). Tests that recreate it take
/// SHARED_DATABASE_LOCK.
pub const WORKER_DATABASE: &str = "meter_test";
pub static SHARED_DATABASE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn port() -> u16 {
    std::env::var("METER_TEST_PORT")
        .expect("METER_TEST_PORT is set by scripts/integration.sh")
        .parse()
        .expect("METER_TEST_PORT is a port number")
}

pub fn connect(database: &str) -> Client {
    Client::connect(
        &format!("host=localhost port={} user=postgres dbname={database}", port()),
        NoTls,
    )
    .unwrap_or_else(|e| panic!("connecting to {database}: {e}"))
}

/// A new, empty database with meter_ext created in it. Each test uses its own.
pub fn fresh_database(name: &str) -> Client {
    fresh_database_at(name, None)
}

/// As `fresh_database`, with meter_ext at `version` (None: the default version).
pub fn fresh_database_at(name: &str, version: Option<&str>) -> Client {
    let mut admin = connect("postgres");
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .unwrap();
    admin.batch_execute(&format!("CREATE DATABASE \"{name}\"")).unwrap();
    let mut client = connect(name);
    let version = version.map(|v| format!(" VERSION '{v}'")).unwrap_or_default();
    client
        .batch_execute(&format!("CREATE EXTENSION meter_ext{version}"))
        .unwrap();
    client
}

/// Meters whose value differs from the one re-derived from their usage audit.
pub fn unverified_meters(db: &mut Client) -> i64 {
    db.query_one("SELECT count(*) FROM meter.verify_meters() WHERE NOT matches", &[])
        .unwrap()
        .get(0)
}

/// A connection that LISTENs and collects notifications as (channel, JSON payload).
pub struct Listener {
    client: Client,
}

impl Listener {
    pub fn new(database: &str, channels: &[&str]) -> Listener {
        let mut client = connect(database);
        for channel in channels {
            client.batch_execute(&format!("LISTEN \"{channel}\"")).unwrap();
        }
        Listener { client }
    }

    /// Collects notifications until `done` says the collection is complete or
    /// `timeout` passes; returns what arrived.
    pub fn until(
        &mut self,
        done: impl Fn(&[(String, serde_json::Value)]) -> bool,
        timeout: std::time::Duration,
    ) -> Vec<(String, serde_json::Value)> {
        let deadline = std::time::Instant::now() + timeout;
        let mut collected = Vec::new();
        while !done(&collected) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let mut notifications = self.client.notifications();
            let mut arriving = notifications.timeout_iter(left.min(std::time::Duration::from_millis(100)));
            while let Some(n) = arriving.next().expect("listening connection") {
                let payload = serde_json::from_str(n.payload())
                    .unwrap_or_else(|e| panic!("payload on {} is not JSON ({e}): {}", n.channel(), n.payload()));
                collected.push((n.channel().to_string(), payload));
                if done(&collected) {
                    break;
                }
            }
        }
        collected
    }
}
