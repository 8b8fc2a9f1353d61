//! `cargo bench --bench suite -- <figure> [options]`: Tollgate's load
//! generator and its baseline, described in BENCHMARKS.md.

// The command line and the CI test each use only part of the suite.
#[allow(dead_code)]
#[path = "mod.rs"]
mod suite;

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
