//! Open files: raising this process's soft limit to its hard one, checking
//! before a run that this process and the server can each hold the sockets
//! it will open, and naming EMFILE plainly when it happens anyway.

use std::io;

use anyhow::{Result, bail};
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

use crate::suite::stats::thousands;

/// Open files a process needs besides its sockets: the database and its
/// journal, pipes, the runtime's own descriptors, the HTTP clients of the
/// suite. Generous, since running short mid-run spoils the figures.
pub const MARGIN: u64 = 100;

/// Raises the soft limit on open files to the hard one, so that the server
/// started afterwards inherits it too; returns the soft limit now in force.
pub fn raise_own_limit() -> u64 {
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit { current: limit.maximum, maximum: limit.maximum };
        // Should raising fail, the check that follows tells what is left.
        let _ = setrlimit(Resource::Nofile, raised);
    }
    own_limit()
}

/// The soft limit on open files of this process.
pub fn own_limit() -> u64 {
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Stops before a run in which `who` (limited to `limit`) would need more
/// open files than it may hold for `sockets` sockets opened for `what`.
pub fn check(who: &str, what: &str, sockets: u64, limit: u64) -> Result<()> {
    let needed = sockets + MARGIN;
    if needed > limit {
        bail!(
            "{what} need about {} open files but {who} may hold {}: raise the hard limit \
             (ulimit -Hn) or run fewer",
            thousands(needed),
            thousands(limit)
        );
    }
    Ok(())
}

/// Whether `error` is EMFILE: the process holds all the files it may.
pub fn is_exhausted(error: &io::Error) -> bool {
    error.raw_os_error() == Some(rustix::io::Errno::MFILE.raw_os_error())
}

/// What to report for EMFILE in this process.
pub fn exhausted_here() -> String {
    format!("out of file descriptors: this process may hold {}", thousands(own_limit()))
}
