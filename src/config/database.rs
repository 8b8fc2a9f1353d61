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
        let Some(text) = value.to_str().filter(|text| is_postgres_url(text)) else {
            return Ok(Database::Sqlite(value.to_owned()));
        };
        if let Err(error) = text.parse::<tokio_postgres::Config>() {
            return Err(format!("db (--db): not a valid PostgreSQL URL: {error}"));
        }
        Ok(Database::Postgres(PostgresUrl(text.to_owned())))
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

/// A PostgreSQL URL. Shown (`Display`, `Debug`) with its password and
/// query left out: `postgres://user@host:5432/dbname`.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresUrl(String);

impl PostgresUrl {
    /// The whole URL, password included, for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (scheme, rest) = self.0.split_once("://").unwrap_or(("postgres", &self.0));
        let rest = rest.split_once('?').map_or(rest, |(before, _)| before);
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (user, host) = match authority.rsplit_once('@') {
            Some((user_info, host)) => (user_info.split(':').next(), host),
            None => (None, authority),
        };
        write!(f, "{scheme}://")?;
        if let Some(user) = user {
            write!(f, "{user}@")?;
        }
        write!(f, "{host}/{path}")
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
    fn a_malformed_url_is_refused_with_the_setting_named() {
        let error = parse("postgres://ada:s3cret@db:notaport/x").unwrap_err();
        assert!(error.starts_with("db (--db)"), "{error}");
        assert!(!error.contains("s3cret"), "{error}");
    }
}
