//! Tollgate's benchmark suite: the server as a child process and a plain
//! echo server to compare it with, WebSocket and HTTP clients to load
//! them, one module per figure, and the targets the figures are held to.
//! `main.rs` runs it from the command line; `tests/bench_suite.rs` mounts
//! the same modules and runs every figure once at a small size. Both mount
//! it as `crate::suite`, the path its modules use for one another.

pub mod api;
pub mod baseline;
pub mod clients;
pub mod fds;
pub mod figures;
pub mod postgres;
pub mod procfs;
pub mod prometheus;
pub mod server;
pub mod stats;
pub mod targets;
