//! Connections to the cluster scripts/integration.sh started.

use postgres::{Client, NoTls};

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
    let mut admin = connect("postgres");
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .unwrap();
    admin.batch_execute(&format!("CREATE DATABASE \"{name}\"")).unwrap();
    let mut client = connect(name);
    client.batch_execute("CREATE EXTENSION meter_ext").unwrap();
    client
}
