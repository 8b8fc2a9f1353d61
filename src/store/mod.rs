//! The storage interface: everything the HTTP handlers and the meter need
//! to persist, with no trace of the database behind it. Two backends
//! implement [`Store`]: SQLite ([`sqlite::SqliteStore`]), the default, and
//! PostgreSQL ([`postgres::PostgresStore`]); [`hooks`] holds what both read
//! of a project's webhook.
//!
//! Amounts are in base units (milliseconds for seconds limits, tokens for
//! `token_cnt`) and times are Unix milliseconds, both as `i64`.

mod hooks;
pub mod postgres;
pub mod sqlite;

use std::time::Duration;

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

/// An API key found by its hash.
#[derive(Clone, Copy, Debug)]
pub struct ApiKeyRecord {
    pub project: ProjectId,
    pub revoked: bool,
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
    pub caller: SessionCaller,
    pub kind: SessionKind,
    pub public_id: String,
    pub max_sessions_per_human: Option<u32>,
    pub now: UnixMillis,
}

/// Who opens a session, as its admission checks it.
#[derive(Clone, Debug)]
pub enum SessionCaller {
    /// A usage token, by the hash it is looked up by: found and checked
    /// live inside the admission's transaction, with no lookup before it
    /// (which cost every upgrade a trip to the store and back).
    Token(SecretHash),
    /// The human an API key's caller named in `x-human-id`.
    Human(Human),
}

impl SessionCaller {
    /// The human and the token a session is opened for, given the token
    /// the admission found by its hash; or why no session may be opened.
    pub fn with_token(
        found: Option<UsageTokenRecord>,
        now: UnixMillis,
    ) -> Result<(Human, Option<i64>), Admission> {
        match found {
            None => Err(Admission::UnknownToken),
            Some(token) if token.revoked => Err(Admission::TokenRevoked),
            Some(token) if token.expires_at <= now => Err(Admission::TokenExpired),
            Some(token) => Ok((token.human, Some(token.id))),
        }
    }
}

/// The store's answer to [`NewSession`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    Admitted {
        key: SessionKey,
        human: Human,
        /// The remaining amount of the kind's limit, `None` when unlimited.
        remaining: Option<i64>,
        revocation_epoch: i64,
    },
    /// No usage token has the hash presented.
    UnknownToken,
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
    /// Makes the batch's commit idempotent: a batch with the id of the last
    /// one the store applied is not applied again, and is answered as that
    /// one was (the pools as they are, the sessions' charges). The meter
    /// sends a batch whose commit failed again under its id, since a
    /// failure may come after the commit (a connection lost once COMMIT was
    /// sent). `None` applies the batch whatever came before.
    pub id: Option<BatchId>,
    pub charges: Vec<Charge>,
    pub ends: Vec<SessionEnd>,
    /// Pools to report on as they stand, without charging them: a store
    /// that other servers share ([`Store::is_shared`]) answers with their
    /// state, changes made through the others included; other stores
    /// leave them out.
    pub watch: Vec<(HumanId, LimitType)>,
}

/// A [`UsageBatch`]'s id: random, so that no two runs of the meter share
/// one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchId(pub i64);

impl BatchId {
    pub fn random() -> BatchId {
        BatchId(rand::random())
    }
}

impl UsageBatch {
    /// The same batch, applying nothing: every charge is of zero, so that
    /// the store's answer (pools, ended sessions) is read as it stands.
    /// What a repeated batch is answered with.
    pub fn as_repeated(&self) -> UsageBatch {
        let charges = self.charges.iter().map(|charge| Charge { amount: 0, ..*charge }).collect();
        UsageBatch { id: self.id, charges, ends: self.ends.clone(), watch: self.watch.clone() }
    }
}

/// What the store did with a [`UsageBatch`].
#[derive(Clone, Debug, Default)]
pub struct UsageRecorded {
    /// The state of every pool the batch charged, and of those it watched.
    pub pools: Vec<PoolState>,
    /// Each session the batch ended, with all it was charged in the end
    /// (which a pool that ran dry may have cut below the time it ran), in
    /// the order of the batch's `ends`.
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
    /// A webhook's "running low" line not yet crossed: the store wants the
    /// pool's usage recorded as soon as the remaining value falls below it,
    /// so that the event fires on time.
    pub low_line: Option<i64>,
    /// The pool's sessions that other servers sharing the store meter.
    pub foreign: Foreign,
}

/// The sessions of a pool that other servers meter, as a shared store
/// ([`Store::is_shared`]) sees them at the moment of a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Foreign {
    /// How many are open; each drains the pool at wall-clock rate.
    pub sessions: u32,
    /// What they have used up to the batch's moment beyond what their
    /// servers have recorded; negative where a server has recorded a
    /// session beyond that moment (its batch came later).
    pub unrecorded: i64,
}

/// A chat completion's key in the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CompletionKey(pub i64);

/// What starting a chat completion asks for. The store holds part of the
/// human's `token_cnt` for it in the same transaction as it checks what is
/// left, so that concurrent completions cannot together overspend.
#[derive(Clone, Debug)]
pub struct NewCompletion {
    pub human: HumanId,
    /// The token the request came with, re-checked in the transaction;
    /// `None` for a request made with an API key.
    pub token: Option<i64>,
    pub public_id: String,
    pub model: String,
    /// The prompt's tokens as Tollgate's tokenizer counts them.
    pub prompt_estimate: i64,
    /// Completion tokens per choice the request asks for: its own cap, or
    /// the configured default.
    pub wanted: i64,
    /// How many answers (`n`) the request asks for.
    pub choices: i64,
    pub now: UnixMillis,
}

/// The store's answer to [`NewCompletion`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompletionAdmission {
    Admitted {
        key: CompletionKey,
        /// The completion tokens per choice held for it, at most what it
        /// wanted; `None` when `token_cnt` is not limited for the human,
        /// and nothing is held.
        allowance: Option<i64>,
    },
    LimitExhausted,
    TokenRevoked,
    TokenExpired,
}

/// Where a completion's token counts came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageSource {
    /// The upstream's `usage`.
    Upstream,
    /// Tollgate's tokenizer, because the upstream reported none.
    Counted,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Upstream => "upstream",
            UsageSource::Counted => "counted",
        }
    }
}

/// How a chat completion ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionOutcome {
    Completed,
    /// The client went away before the answer ended.
    ClientGone,
    /// The upstream answered with an error or broke off.
    UpstreamFailed,
    /// The server stopped while the answer was coming.
    ServerShutdown,
    /// A previous run of the server stopped while it was running.
    ServerRestart,
    /// The server relaying it went silent, and another sharing the store
    /// ended it.
    InstanceLost,
}

impl CompletionOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CompletionOutcome::Completed => "completed",
            CompletionOutcome::ClientGone => "client_gone",
            CompletionOutcome::UpstreamFailed => "upstream_failed",
            CompletionOutcome::ServerShutdown => "server_shutdown",
            CompletionOutcome::ServerRestart => "server_restart",
            CompletionOutcome::InstanceLost => "instance_lost",
        }
    }
}

/// The end of a chat completion: its hold is released and its usage
/// debited in full, even past what was held.
#[derive(Clone, Copy, Debug)]
pub struct CompletionEnd {
    pub key: CompletionKey,
    pub human: HumanId,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub source: UsageSource,
    pub outcome: CompletionOutcome,
    pub now: UnixMillis,
}

/// Usage a backend measured itself.
#[derive(Clone, Debug)]
pub struct NewReport {
    pub project: ProjectId,
    pub human: String,
    pub limit_type: LimitType,
    /// In base units, more than zero.
    pub amount: i64,
    pub idempotency_key: String,
    /// The report's metadata as compact JSON text.
    pub metadata: Option<String>,
    pub now: UnixMillis,
}

/// A recorded usage report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub id: i64,
    pub human: String,
    pub limit_type: LimitType,
    pub amount: i64,
    pub idempotency_key: String,
    pub metadata: Option<String>,
    /// The pool's value right after the report; `None` when not limited.
    pub remaining: Option<i64>,
    pub created_at: UnixMillis,
}

/// The store's answer to [`NewReport`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReportOutcome {
    Recorded(Report),
    /// The key was used before by the same report, which is returned and
    /// not recorded again.
    Repeated(Report),
    /// The key was used before by a different report, returned as it was.
    KeyReused(Report),
}

/// A project's webhook, without its secrets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Webhook {
    pub url: String,
    /// The event types it wants; `None` for all.
    pub events: Option<Vec<String>>,
    /// "Running low" lines, in base units.
    pub thresholds: Vec<Limit>,
    /// Until when a rotated-out secret still signs, if one does.
    pub previous_secret_until: Option<UnixMillis>,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
}

/// What setting a webhook asks for.
#[derive(Clone, Debug)]
pub struct WebhookChange {
    pub project: ProjectId,
    pub url: String,
    pub events: Option<Vec<String>>,
    pub thresholds: Vec<Limit>,
    /// The secret for a new webhook; an existing one keeps its own.
    pub secret: String,
    pub now: UnixMillis,
}

/// Where a webhook event stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryStatus {
    Pending,
    Delivered,
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        }
    }

    pub fn parse(name: &str) -> Option<DeliveryStatus> {
        match name {
            "pending" => Some(DeliveryStatus::Pending),
            "delivered" => Some(DeliveryStatus::Delivered),
            "failed" => Some(DeliveryStatus::Failed),
            _ => None,
        }
    }
}

/// A webhook event and how its delivery went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The outbox row, for cursors.
    pub seq: i64,
    /// The event's id, sent as `webhook-id` on every attempt.
    pub id: String,
    pub kind: String,
    pub status: DeliveryStatus,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub created_at: UnixMillis,
    pub next_attempt_at: Option<UnixMillis>,
    pub delivered_at: Option<UnixMillis>,
}

/// An event due for an attempt, with where and how to send it.
#[derive(Clone, Debug)]
pub struct DueEvent {
    pub seq: i64,
    pub id: String,
    pub project: ProjectId,
    pub body: String,
    pub attempts: i64,
    pub created_at: UnixMillis,
    /// `None` when the project's webhook is gone.
    pub url: Option<String>,
    /// The secrets that sign it: the current one first.
    pub secrets: Vec<String>,
}

/// How long an event handed out by [`Store::due_events`] on PostgreSQL
/// stays claimed by the server it was handed to: no other server finds it
/// due until then. A minute holds the dispatcher's whole attempt with room
/// to spare: the claim and the record of the outcome are store calls of a
/// few seconds each at worst, the attempt's own timeout is cut to half the
/// lease, and what is left covers a stalled process or the clocks of two
/// servers a little apart. It is also how long the events of a server that
/// died mid-attempt wait before another server attempts them again, which
/// is short next to the retries' backoff of up to an hour.
pub const DELIVERY_LEASE: Duration = Duration::from_secs(60);

/// How an attempt went.
#[derive(Clone, Debug)]
pub enum AttemptOutcome {
    Delivered,
    /// Failed; tried again at `retry_at`, or never when `None`.
    Failed {
        error: String,
        retry_at: Option<UnixMillis>,
    },
}

/// Where a listing starts and how long it may be: the rows after the one
/// `after` names (exclusive; `None` from the first), at most `limit` of
/// them.
#[derive(Clone, Debug)]
pub struct Page<C> {
    pub after: Option<C>,
    pub limit: u32,
}

/// One page of a listing, oldest first.
#[derive(Clone, Debug)]
pub struct Listing<T> {
    pub rows: Vec<T>,
    /// Whether more rows matched after the last one when the page was read.
    pub has_more: bool,
}

impl<T> Listing<T> {
    pub fn empty() -> Listing<T> {
        Listing { rows: Vec::new(), has_more: false }
    }
}

/// Which of a project's ledger rows to list.
#[derive(Clone, Debug)]
pub struct LedgerFilter {
    pub project: ProjectId,
    /// Only this human's rows; a name the project has never used lists
    /// nothing.
    pub human: Option<String>,
    pub limit_type: Option<LimitType>,
}

/// What a ledger row did to its pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LedgerEntry {
    /// A set or top-up of a limit.
    Grant,
    /// A session's use over at most a minute, a chat completion, or a
    /// usage report.
    Debit,
    /// Time given back to a dead client.
    Refund,
}

impl LedgerEntry {
    pub fn as_str(self) -> &'static str {
        match self {
            LedgerEntry::Grant => "grant",
            LedgerEntry::Debit => "debit",
            LedgerEntry::Refund => "refund",
        }
    }

    pub fn parse(name: &str) -> Option<LedgerEntry> {
        [LedgerEntry::Grant, LedgerEntry::Debit, LedgerEntry::Refund]
            .into_iter()
            .find(|entry| entry.as_str() == name)
    }
}

/// A row of the ledger as it is listed, with the public ids of what it
/// comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerRow {
    pub id: i64,
    pub human: String,
    pub limit_type: LimitType,
    pub entry: LedgerEntry,
    /// Negative for a debit.
    pub amount: i64,
    pub created_at: UnixMillis,
    /// Later than `created_at` for a session's debit that grew with the
    /// ticks after it was written.
    pub updated_at: UnixMillis,
    pub session: Option<String>,
    pub completion: Option<String>,
    pub report: Option<ReportRef>,
}

/// The usage report a ledger row comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportRef {
    pub id: i64,
    pub idempotency_key: String,
}

/// Whether a session is still running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionState {
    Open,
    Ended,
}

/// Which of a project's sessions to list.
#[derive(Clone, Debug)]
pub struct SessionFilter {
    pub project: ProjectId,
    /// Only this human's sessions; a name the project has never used lists
    /// nothing.
    pub human: Option<String>,
    pub state: Option<SessionState>,
}

/// A session as it is listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRow {
    pub public_id: String,
    pub human: String,
    pub kind: SessionKind,
    pub started_at: UnixMillis,
    pub ended_at: Option<UnixMillis>,
    /// All it was charged, refunds taken off; for an open session, what
    /// it was charged up to the last tick.
    pub charged: i64,
    /// The name of its [`EndReason`], as it was recorded.
    pub end_reason: Option<String>,
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// The database is locked, read-only or gone: writes may work again
    /// later.
    #[error("the store cannot be written: {0}")]
    Unavailable(String),
    /// The database has reached its cap (`--max-db-mb`) or its disk is
    /// full: writes work again once pages or disk space are freed.
    #[error("the database is full")]
    Full,
    /// A change would take a limit above [`crate::limits::MAX_LIMIT_VALUE`].
    #[error("{} would exceed the largest allowed value", .0.as_str())]
    LimitOverflow(LimitType),
    /// A debit would take a pool below minus the largest limit.
    #[error("{} would go below the lowest allowed value", .0.as_str())]
    BalanceFloor(LimitType),
    #[error("the store's writer has stopped")]
    Closed,
    /// Another server has taken over the database since this one took it
    /// (PostgreSQL only): this one may no longer record usage, now or
    /// later, and does not try again.
    #[error("another server has taken over the database")]
    Superseded,
    #[error("store error: {0}")]
    Other(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Answers when the store can be read and has room to be written.
    async fn ping(&self) -> StoreResult<()>;

    /// Whether other servers may share the store (PostgreSQL). The meter
    /// of a shared store commits at every tick, which tells the others it
    /// is alive, charges at every tick the pools other servers' sessions
    /// draw on too, and watches the rest (see [`UsageBatch::watch`]).
    fn is_shared(&self) -> bool {
        false
    }

    /// Ends, on a shared store, some of the sessions and completions of
    /// other servers gone silent (see `instances` in schema.postgres.sql),
    /// a bounded step at a time; returns how many of each this step ended,
    /// and is called again while it ends any. Nothing on a store no other
    /// server shares.
    async fn close_out_lost(&self) -> StoreResult<(u64, u64)> {
        Ok((0, 0))
    }

    /// Says that this server has stopped, every session's usage recorded,
    /// so that the servers sharing the store need not wait for it to fall
    /// silent. Nothing on a store no other server shares.
    async fn leave(&self) -> StoreResult<()> {
        Ok(())
    }

    /// Creates the project if it does not exist and adds an API key to it.
    async fn add_api_key(&self, project: &str, key: SecretHash) -> StoreResult<()>;

    /// Revokes a live API key; false if there is none with that hash.
    async fn revoke_api_key(&self, key: SecretHash) -> StoreResult<bool>;

    async fn has_projects(&self) -> StoreResult<bool>;

    async fn find_api_key(&self, key: SecretHash) -> StoreResult<Option<ApiKeyRecord>>;

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
    /// their usage as of the last recorded tick. Returns how many. On a
    /// shared store, only those no run meters (see
    /// [`Store::close_out_lost`] for the rest).
    async fn close_abandoned_sessions(&self) -> StoreResult<u64>;

    /// Starts a chat completion, holding tokens for it if `token_cnt` is
    /// limited for the human.
    async fn start_completion(&self, completion: NewCompletion)
    -> StoreResult<CompletionAdmission>;

    /// Ends a chat completion: releases its hold and debits its usage.
    /// Returns the human's remaining `token_cnt`, `None` when unlimited.
    async fn end_completion(&self, end: CompletionEnd) -> StoreResult<Option<i64>>;

    /// Ends the completions a previous run left running (outcome
    /// `server_restart`), releasing their holds and charging each its
    /// prompt's estimate: what the upstream answered was never seen.
    /// Returns how many.
    async fn close_abandoned_completions(&self, now: UnixMillis) -> StoreResult<u64>;

    /// Records a usage report, or finds the one recorded earlier under its
    /// idempotency key.
    async fn report_usage(&self, report: NewReport) -> StoreResult<ReportOutcome>;

    /// Creates or changes the project's webhook; returns it, and whether it
    /// was created (and so signs with the change's secret).
    async fn set_webhook(&self, change: WebhookChange) -> StoreResult<(Webhook, bool)>;

    async fn webhook(&self, project: ProjectId) -> StoreResult<Option<Webhook>>;

    /// Removes the project's webhook; its undelivered events are marked
    /// failed. Returns whether there was one.
    async fn delete_webhook(&self, project: ProjectId) -> StoreResult<bool>;

    /// Gives the webhook a new secret; the old one signs too until
    /// `previous_until`. Returns whether there was a webhook.
    async fn rotate_webhook_secret(
        &self,
        project: ProjectId,
        secret: String,
        previous_until: UnixMillis,
        now: UnixMillis,
    ) -> StoreResult<bool>;

    /// Pending events whose next attempt is due, oldest first, leaving out
    /// `busy` (those this server is attempting), at most `limit` of them.
    ///
    /// On PostgreSQL, which several servers may share, the events returned
    /// are claimed for this server: their next attempt is put off by
    /// [`DELIVERY_LEASE`] from `now` in the statement that selects them,
    /// and rows another server is claiming at that moment are skipped, so
    /// two servers never get the same event. The caller is expected to
    /// attempt every event returned and record its outcome; an event whose
    /// outcome is never recorded (its server died) is due again when the
    /// lease runs out, and is attempted again under the same id (the lost
    /// attempt is not counted in `attempts`, which counts outcomes). Since
    /// each one returned is claimed, a project gets at most `per_project`
    /// less its `busy` ones.
    ///
    /// On SQLite, which one server uses alone, nothing is claimed: `busy`
    /// alone keeps an event from being handed out twice, and a project
    /// gets at most `per_project` beside its busy ones.
    async fn due_events(
        &self,
        now: UnixMillis,
        busy: Vec<i64>,
        per_project: u32,
        limit: u32,
    ) -> StoreResult<Vec<DueEvent>>;

    /// Records an attempt's outcome, and counts the attempt, if the event is
    /// still pending; an event delivered, given up on or failed by the
    /// removal of its webhook in the meantime is left as it is.
    ///
    /// On PostgreSQL nothing tells one claim of an event from the next, so
    /// the outcome of an attempt that outlived its lease is recorded even
    /// if another server has claimed the event again since: a delivery
    /// marks it delivered (the other attempt's outcome then finds it so and
    /// is dropped, and the endpoint has it twice under one id), and a
    /// failure sets its next attempt, which may end the other server's
    /// claim early. For that reason the dispatcher keeps its attempts well
    /// inside the lease, and records no failure once the lease has run out.
    async fn record_attempt(
        &self,
        seq: i64,
        outcome: AttemptOutcome,
        now: UnixMillis,
    ) -> StoreResult<()>;

    /// The project's events, oldest first, after the cursor `after`.
    async fn deliveries(
        &self,
        project: ProjectId,
        status: Option<DeliveryStatus>,
        after: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<Delivery>>;

    /// Makes a failed or pending event due now again. Returns it, or
    /// `None` for no such event of the project. On PostgreSQL a pending
    /// event due within [`DELIVERY_LEASE`] anyway is left as it is: it may
    /// be claimed by a server attempting it right now, and making it due
    /// would let a second server attempt it at the same time.
    async fn retry_delivery(
        &self,
        project: ProjectId,
        id: &str,
        now: UnixMillis,
    ) -> StoreResult<Option<Delivery>>;

    /// A page of the project's ledger rows in the order of their ids, which
    /// is the order they were written in.
    async fn ledger(
        &self,
        filter: LedgerFilter,
        page: Page<i64>,
    ) -> StoreResult<Listing<LedgerRow>>;

    /// A page of the project's sessions in the order they were opened,
    /// after the session whose public id `page.after` is. `None` when that
    /// id names no session of the project.
    async fn sessions(
        &self,
        filter: SessionFilter,
        page: Page<String>,
    ) -> StoreResult<Option<Listing<SessionRow>>>;
}
