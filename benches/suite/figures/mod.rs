//! One module per figure of BENCHMARKS.md. Each has a `Config` with its
//! full and small sizes, runs against a server of its own, and returns a
//! report that prints itself.

pub mod mints;
pub mod pair;
pub mod relay;
pub mod sessions;
pub mod soak;
pub mod upgrades;
