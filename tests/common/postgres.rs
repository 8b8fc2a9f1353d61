//! A fresh PostgreSQL database per test, in the server that
//! `TOLLGATE_TEST_POSTGRES` names (`.ci/postgres` starts one and sets it).
//! Without the variable the PostgreSQL cases are skipped, saying so, unless
//! `TOLLGATE_REQUIRE_POSTGRES` is set (as CI sets it), which fails them.

use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio_postgres::NoTls;

/// The variable naming the server the tests may create databases in.
pub const SERVER_VARIABLE: &str = "TOLLGATE_TEST_POSTGRES";

/// The server's URL, or `None` after saying why the case is skipped.
pub fn server(case: &str) -> Option<String> {
    match std::env::var(SERVER_VARIABLE) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var_os("TOLLGATE_REQUIRE_POSTGRES").is_none(),
                "{SERVER_VARIABLE} is not set and TOLLGATE_REQUIRE_POSTGRES is"
            );
            say(&format!(
                "skipped the PostgreSQL case of {case}: {SERVER_VARIABLE} is not set \
                 (run the tests under .ci/postgres for them)"
            ));
            None
        }
    }
}

/// The PEM file of the CA that signed the test server's certificate (for
/// `localhost`), when `.ci/postgres` made one (`TOLLGATE_TEST_POSTGRES_CA`).
#[allow(dead_code)]
pub fn ca_file() -> Option<String> {
    std::env::var("TOLLGATE_TEST_POSTGRES_CA").ok().filter(|path| !path.is_empty())
}

/// A database made for one test, dropped (with any connection still open
/// to it) when this is dropped, even after a failed assertion.
pub struct FreshDatabase {
    server: String,
    name: String,
    /// The URL of the new database.
    pub url: String,
}

impl FreshDatabase {
    pub async fn create(server: &str) -> FreshDatabase {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "tollgate_test_{}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        execute(server, &format!("CREATE DATABASE {name}")).await;
        let url = with_database(server, &name);
        FreshDatabase { server: server.to_owned(), name, url }
    }
}

impl Drop for FreshDatabase {
    fn drop(&mut self) {
        let (server, sql) =
            (self.server.clone(), format!("DROP DATABASE {} WITH (FORCE)", self.name));
        // Drop runs inside the test's runtime, which cannot block on a
        // future of its own: the drop gets a thread and a runtime.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
            runtime.unwrap().block_on(execute(&server, &sql));
        });
        if dropped.join().is_err() {
            say(&format!("could not drop the test database {}", self.name));
        }
    }
}

/// Runs one statement on the server's own database.
async fn execute(server: &str, sql: &str) {
    let (client, connection) = tokio_postgres::connect(server, NoTls).await.unwrap();
    let driver = tokio::spawn(connection);
    client.batch_execute(sql).await.unwrap();
    drop(client);
    let _ = driver.await;
}

/// `server`'s URL with its database replaced by `name`.
fn with_database(server: &str, name: &str) -> String {
    let (base, query) = match server.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (server, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |at| at + 3);
    let host_end = base[scheme_end..].find('/').map_or(base.len(), |at| scheme_end + at);
    format!("{}/{name}{query}", &base[..host_end])
}

/// Writes to the real standard error, past the test harness's capture.
pub fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}
