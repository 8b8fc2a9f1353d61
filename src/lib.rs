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
mod read_ahead;
pub mod secret;
pub mod session;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod webhooks;

/// What the fuzz targets in `fuzz/` drive: the checks that turn request
/// bodies into typed values, and the session's decisions about frames. The
/// targets are a crate of their own, which sees only what is public, and
/// these are private to their modules. Not part of Tollgate's interface.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::api::extract::{MAX_HUMAN_BYTES, parse_json};
    pub use crate::api::reports::ReportBody;
    pub use crate::api::tokens::{ChangeLimits, CreateToken, HumanOnly, UpdateTtl};
    pub use crate::api::webhooks::{SetWebhook, grace_millis};
    pub use crate::llm::request::ChatRequest;
    pub use crate::session::frames::*;

    use crate::secret::{Secret, SecretKind};

    /// The secret of the given kind whose random body is `random`.
    pub fn secret_from(kind: SecretKind, random: [u8; 32]) -> Secret {
        Secret::from_random(kind, random)
    }
}

pub use app::{DEFAULT_PROJECT, RunningServer, create_api_key, revoke_api_key, start};
pub use webhooks::signature::verify;
