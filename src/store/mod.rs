//! The storage interface: everything the HTTP handlers and the meter need
//! to persist, with no trace of the database behind it. SQLite
//! ([`sqlite::SqliteStore`]) is the one backend today; a second one only has
//! to implement [`Store`].
//!
//! Amounts are in base units (milliseconds for seconds limits, tokens for
//! `token_cnt`) and times are Unix milliseconds, both as `i64`.

pub mod sqlite;

use async_trait::async_trait;

use crate::close::EndReason;
use crate::limits::{ChangeMode, Limit, LimitType, SessionKind};
use crate::secret::SecretHash;

/// Wall-clock time as Unix milliseconds.
pub type UnixMillis = i64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProjectId(pub i64);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HumanId(pub i64);

/// A session's key in the store (not its public id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey(pub i64);

/// A human as the store knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Human {
    pub id: HumanId,
    pub project: ProjectId,
    /// The app's own identifier for the human.
    pub name: String,
    /// Bumped by every revocation; a session opened under an older epoch is
    /// closed when the meter sees the new one.
    pub revocation_epoch: i64,
}

/// A usage token found by its hash.
#[derive(Clone, Debug)]
pub struct UsageTokenRecord {
    pub id: i64,
    pub human: Human,
    pub expires_at: UnixMillis,
    pub revoked: bool,
}

/// What minting a token asks for.
#[derive(Clone, Debug)]
pub struct MintRequest {
    pub project: ProjectId,
    pub human: String,
    pub token_hash: SecretHash,
    pub now: UnixMillis,
    pub expires_at: UnixMillis,
    /// Set these limits for the human in the same transaction; `None`
    /// leaves the human's limits as they are.
    pub limits: Option<Vec<Limit>>,
}

/// What opening a session asks for. The store checks and records it in one
/// transaction, so that concurrent upgrades cannot slip past a cap.
#[derive(Clone, Debug)]
pub struct NewSession {
    pub human: HumanId,
    pub kind: SessionKind,
    pub public_id: String,
    /// The token the session was opened with, re-checked in the
    /// transaction; `None` for a session opened with an API key.
    pub token: Option<i64>,
    pub max_sessions_per_human: Option<u32>,
    pub now: UnixMillis,
}

/// The store's answer to [`NewSession`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    Admitted {
        key: SessionKey,
        /// The remaining amount of the kind's limit, `None` when unlimited.
        remaining: Option<i64>,
        revocation_epoch: i64,
    },
    LimitExhausted,
    TooManySessions,
    TokenRevoked,
    TokenExpired,
}

/// Time used by one session since its last recorded charge. A negative
/// amount gives time back (a dead client is charged only up to its last
/// frame); the store never gives back more than the session was debited.
#[derive(Clone, Copy, Debug)]
pub struct Charge {
    pub session: SessionKey,
    pub human: HumanId,
    pub limit_type: LimitType,
    pub amount: i64,
}

/// A session whose end is to be recorded.
#[derive(Clone, Copy, Debug)]
pub struct SessionEnd {
    pub session: SessionKey,
    pub reason: EndReason,
}

/// All the usage the meter records in one transaction: a tick, a cut-off,
/// or the ends of sessions.
#[derive(Clone, Debug, Default)]
pub struct UsageBatch {
    pub charges: Vec<Charge>,
    pub ends: Vec<SessionEnd>,
}

/// What the store did with a [`UsageBatch`].
#[derive(Clone, Debug, Default)]
pub struct UsageRecorded {
    /// The state of every pool the batch charged.
    pub pools: Vec<PoolState>,
    /// Each session the batch ended, with all it was charged in the end
    /// (which a pool that ran dry may have cut below the time it ran).
    pub ended: Vec<(SessionKey, i64)>,
}

/// A pool (one human's limit of one type) after a batch was applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolState {
    pub human: HumanId,
    pub limit_type: LimitType,
    /// `None` when the human has no limit of this type.
    pub remaining: Option<i64>,
    pub revocation_epoch: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database is locked, read-only, full or gone: writes may work
    /// again later.
    #[error("the store cannot be written: {0}")]
    Unavailable(String),
    /// A change would take a limit above [`crate::limits::MAX_LIMIT_VALUE`].
    #[error("{} would exceed the largest allowed value", .0.as_str())]
    LimitOverflow(LimitType),
    #[error("the store's writer has stopped")]
    Closed,
    #[error("store error: {0}")]
    Other(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Answers when the store can be read.
    async fn ping(&self) -> StoreResult<()>;

    /// Creates the project if it does not exist and adds an API key to it.
    async fn add_api_key(&self, project: &str, key: SecretHash) -> StoreResult<()>;

    async fn has_projects(&self) -> StoreResult<bool>;

    async fn find_api_key(&self, key: SecretHash) -> StoreResult<Option<ProjectId>>;

    async fn find_usage_token(&self, token: SecretHash) -> StoreResult<Option<UsageTokenRecord>>;

    async fn find_human(&self, project: ProjectId, name: &str) -> StoreResult<Option<Human>>;

    async fn find_or_create_human(&self, project: ProjectId, name: &str) -> StoreResult<Human>;

    /// Records a new usage token, setting the human's limits if asked, and
    /// returns the human's limits afterwards.
    async fn mint_token(&self, request: MintRequest) -> StoreResult<Vec<Limit>>;

    /// The human's limits: one entry per limited type.
    async fn limits(&self, human: HumanId) -> StoreResult<Vec<Limit>>;

    /// Sets or raises limits (creating the human if needed), writing a grant
    /// to the ledger for each change, and returns the limits afterwards.
    async fn change_limits(
        &self,
        project: ProjectId,
        human: &str,
        changes: Vec<Limit>,
        mode: ChangeMode,
        now: UnixMillis,
    ) -> StoreResult<Vec<Limit>>;

    /// Revokes every live token of the human and bumps its revocation epoch.
    /// Returns the number of tokens revoked, or `None` for an unknown human.
    async fn revoke(
        &self,
        project: ProjectId,
        human: &str,
        now: UnixMillis,
    ) -> StoreResult<Option<u64>>;

    /// The expiry of the human's newest live token.
    async fn newest_live_token(
        &self,
        project: ProjectId,
        human: &str,
        now: UnixMillis,
    ) -> StoreResult<Option<UnixMillis>>;

    /// Moves the expiry of every live token of the human; returns how many.
    async fn set_token_expiry(
        &self,
        project: ProjectId,
        human: &str,
        now: UnixMillis,
        expires_at: UnixMillis,
    ) -> StoreResult<u64>;

    async fn open_session(&self, session: NewSession) -> StoreResult<Admission>;

    /// Applies a batch of usage in one transaction.
    async fn record_usage(&self, batch: UsageBatch, now: UnixMillis) -> StoreResult<UsageRecorded>;

    /// Ends the sessions a previous run left open (reason `server_restart`),
    /// their usage as of the last recorded tick. Returns how many.
    async fn close_abandoned_sessions(&self) -> StoreResult<u64>;
}
