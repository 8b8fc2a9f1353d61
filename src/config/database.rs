//! Which database a `--db` value names: a PostgreSQL URL
//! (`postgres://user@host/dbname`, or `postgresql://`), or else the path of
//! a SQLite file. A URL may carry a password, so it is kept in a type that
//! never prints it.

use std::fmt;
use std::path::{Path, PathBuf};

/// The database the server or a command works on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Database {
    Sqlite(PathBuf),
    Postgres(PostgresUrl),
}

impl Database {
    /// Reads a `--db` value: a PostgreSQL URL if it starts with one's
    /// scheme, a SQLite path otherwise.
    pub fn parse(value: &Path) -> Result<Database, String> {
        if value.to_str().is_some_and(is_key_value_string) {
            return Err(KEY_VALUE_REFUSED.into());
        }
        let Some(text) = value.to_str().filter(|text| is_postgres_url(text)) else {
            return Ok(Database::Sqlite(value.to_owned()));
        };
        let (rest, _) = crate::store::postgres::tls::split(text)
            .map_err(|error| format!("db (--db): {error}"))?;
        let config = match rest.parse::<tokio_postgres::Config>() {
            Ok(config) => config,
            Err(error) => return Err(format!("db (--db): not a valid PostgreSQL URL: {error}")),
        };
        // The user's part ends at the first '@': a second one was meant
        // to be in the password, and the rest of it would be shown as a
        // host.
        let at_in_host = config.get_hosts().iter().any(
            |host| matches!(host, tokio_postgres::config::Host::Tcp(name) if name.contains('@')),
        );
        if at_in_host {
            return Err("db (--db): a '@' in the URL's password must be written %40".into());
        }
        Ok(Database::Postgres(PostgresUrl::new(text, &config)))
    }
}

impl From<PathBuf> for Database {
    fn from(path: PathBuf) -> Database {
        Database::Sqlite(path)
    }
}

fn is_postgres_url(text: &str) -> bool {
    text.starts_with("postgres://") || text.starts_with("postgresql://")
}

const KEY_VALUE_REFUSED: &str = "db (--db): a PostgreSQL connection string of key=value \
    pairs is not read; write it as a URL, postgres://user:password@host:port/dbname \
    (a SQLite file whose name starts so can be given as ./name)";

/// Every keyword libpq reads in a connection string (its
/// `PQconninfoOptions`, PostgreSQL 18), and the few older releases read
/// (`authtype`, `tty`, `requiressl`), so that a string starting with any of
/// them is refused.
const LIBPQ_KEYWORDS: &[&str] = &[
    "service",
    "user",
    "password",
    "passfile",
    "channel_binding",
    "connect_timeout",
    "dbname",
    "host",
    "hostaddr",
    "port",
    "client_encoding",
    "options",
    "application_name",
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "sslmode",
    "sslnegotiation",
    "sslcompression",
    "sslcert",
    "sslkey",
    "sslcertmode",
    "sslpassword",
    "sslkeylogfile",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "requirepeer",
    "require_auth",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "min_protocol_version",
    "max_protocol_version",
    "gssencmode",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "replication",
    "target_session_attrs",
    "load_balance_hosts",
    "scram_client_key",
    "scram_server_key",
    "oauth_issuer",
    "oauth_client_id",
    "oauth_client_secret",
    "oauth_scope",
    "authtype",
    "tty",
    "requiressl",
];

/// Whether `text` starts as a libpq connection string does
/// (`host=db dbname=tollgate`): with one of its keywords and `=`. Taken as
/// a SQLite path, it would quietly become a file of that name.
fn is_key_value_string(text: &str) -> bool {
    let Some((key, _)) = text.trim_start().split_once('=') else {
        return false;
    };
    LIBPQ_KEYWORDS.contains(&key.trim_end().to_ascii_lowercase().as_str())
}

/// A PostgreSQL URL. Shown (`Display`, `Debug`) with only its user, hosts,
/// ports and database name, taken from the parsed connection settings:
/// `postgres://user@host:5432/dbname`. The password and the query are
/// never shown, whatever characters the password holds (tokio-postgres
/// ends the user's part at the first `@`, so a password may hold `/`, `?`
/// or `#`, which cutting the text would show).
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresUrl {
    url: String,
    shown: String,
}

impl PostgresUrl {
    fn new(url: &str, config: &tokio_postgres::Config) -> PostgresUrl {
        PostgresUrl { url: url.to_owned(), shown: shown(config) }
    }

    /// The whole URL, password included, for connecting.
    pub fn expose(&self) -> &str {
        &self.url
    }
}

/// The parts of `config` that may be shown, as a URL.
fn shown(config: &tokio_postgres::Config) -> String {
    let mut text = String::from("postgres://");
    if let Some(user) = config.get_user() {
        text.push_str(user);
        text.push('@');
    }
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(if ports.len() == 1 { ports.first() } else { None });
            let host = match host {
                tokio_postgres::config::Host::Tcp(name) if name.contains(':') => {
                    format!("[{name}]")
                }
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            match port {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }
        })
        .collect();
    text.push_str(&hosts.join(","));
    text.push('/');
    text.push_str(config.get_dbname().unwrap_or(""));
    text
}

impl fmt::Display for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PostgresUrl({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Database, String> {
        Database::parse(Path::new(text))
    }

    #[test]
    fn a_postgres_url_selects_postgres_and_anything_else_is_a_sqlite_path() {
        let url = "postgres://ada@db.example.com:5433/tollgate";
        assert!(matches!(parse(url), Ok(Database::Postgres(u)) if u.expose() == url));
        assert!(matches!(parse("postgresql://h/db"), Ok(Database::Postgres(_))));
        let path = "./postgres.db";
        assert_eq!(parse(path), Ok(Database::Sqlite(PathBuf::from(path))));
    }

    #[test]
    fn a_libpq_key_value_string_is_refused_and_a_url_asked_for() {
        for text in ["host=db dbname=tollgate", "dbname=tollgate", " user = ada host=db"] {
            let error = parse(text).unwrap_err();
            assert!(error.starts_with("db (--db)"), "{text}: {error}");
            assert!(error.contains("postgres://"), "{text}: {error}");
        }
        let firsts = [
            "keepalives=1",
            "gssencmode=disable",
            "channel_binding=require",
            "client_encoding=UTF8",
            "sslcrl=/etc/crl.pem",
            "tcp_user_timeout=5000",
            "sslnegotiation=direct",
            "require_auth=scram-sha-256",
            "load_balance_hosts=random",
            "target_session_attrs=read-write",
            "fallback_application_name=x",
            "krbsrvname=postgres",
        ];
        for first in firsts {
            let text = format!("{first} host=db dbname=tollgate");
            assert!(parse(&text).unwrap_err().starts_with("db (--db)"), "{text}");
        }
        for path in ["./host=db", "hostname=db.sqlite", "data/host=x.db", "tollgate.db"] {
            assert!(matches!(parse(path), Ok(Database::Sqlite(_))), "{path}");
        }
    }

    #[test]
    fn a_url_never_shows_its_password() {
        let Ok(Database::Postgres(url)) =
            parse("postgres://ada:s3cret@db:5432/tollgate?password=s3cret&sslmode=disable")
        else {
            panic!("not a PostgreSQL URL");
        };
        assert_eq!(url.to_string(), "postgres://ada@db:5432/tollgate");
        assert!(!format!("{url:?}").contains("s3cret"));
    }

    #[test]
    fn a_password_with_any_of_the_urls_separators_is_never_shown() {
        for password in ["s3/cret", "s3?cret", "s3%40cret", "s3#cret", "s3:cret", "s3/?#:%40"] {
            let text = format!("postgres://ada:{password}@127.0.0.1:1/x");
            let Ok(Database::Postgres(url)) = parse(&text) else {
                panic!("{password}: not a PostgreSQL URL");
            };
            let (shown, debug) = (url.to_string(), format!("{url:?}"));
            assert_eq!(shown, "postgres://ada@127.0.0.1:1/x", "{password}");
            assert!(!debug.contains("s3"), "{password}: {debug}");
            assert_eq!(url.expose(), text);
        }
        let error = parse("postgres://ada:s3@cret@127.0.0.1:1/x").unwrap_err();
        assert!(error.contains("%40") && !error.contains("cret"), "{error}");
    }

    #[test]
    fn a_url_shows_each_of_its_hosts_with_its_port() {
        let Ok(Database::Postgres(url)) = parse("postgres://ada:pw@a:1,[::1]:2/db") else {
            panic!("not a PostgreSQL URL");
        };
        assert_eq!(url.to_string(), "postgres://ada@a:1,[::1]:2/db");
    }

    #[test]
    fn a_malformed_url_is_refused_with_the_setting_named() {
        let error = parse("postgres://ada:s3cret@db:notaport/x").unwrap_err();
        assert!(error.starts_with("db (--db)"), "{error}");
        assert!(!error.contains("s3cret"), "{error}");
    }

    #[test]
    fn every_sslmode_of_libpq_but_allow_is_taken_and_another_refused() {
        for mode in ["disable", "prefer", "require", "verify-ca", "verify-full"] {
            let url = format!("postgres://ada@db/x?sslmode={mode}&sslrootcert=%2Fca.pem");
            assert!(matches!(parse(&url), Ok(Database::Postgres(_))), "{mode}");
        }
        let error = parse("postgres://ada@db/x?sslmode=allow").unwrap_err();
        assert!(error.starts_with("db (--db): sslmode"), "{error}");
    }

    #[test]
    fn tls_settings_that_would_check_less_than_libpq_are_refused_at_start_up() {
        for query in
            ["sslmode=require&sslrootcert=system", "sslmode=verify-ca", "sslmode=verify-full"]
        {
            let error = parse(&format!("postgres://ada@db/x?{query}")).unwrap_err();
            assert!(error.starts_with("db (--db): sslmode="), "{query}: {error}");
        }
        assert!(matches!(
            parse("postgres://ada@db/x?sslrootcert=system"),
            Ok(Database::Postgres(_))
        ));
    }
}
