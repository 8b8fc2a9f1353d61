//! Tollgate: a self-hosted gateway that meters end users' realtime voice
//! sessions and LLM usage against limits an app's backend sets.
//!
//! The data path, module by module: [`listener`] accepts connections and
//! hands requests to [`api`], which authenticates them and either answers
//! from the [`store`] or admits a realtime [`session`]; the [`meter`]
//! charges every open session on each tick and cuts sessions off when
//! their human's limit runs out. Chat completions go through [`llm`],
//! which holds tokens for each while it runs and debits what it used.
//! Every change of usage is also an event for the project's webhook, which
//! [`webhooks`] delivers, signed; [`verify`] checks a delivery for a
//! receiver written in Rust.

pub mod api;
mod app;
pub mod clock;
pub mod close;
pub mod config;
mod ids;
pub mod limits;
mod listener;
pub mod llm;
pub mod meter;
pub mod metrics;
mod outbound;
pub mod secret;
pub mod session;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod webhooks;

pub use app::{DEFAULT_PROJECT, RunningServer, create_api_key, revoke_api_key, start};
pub use webhooks::signature::verify;
