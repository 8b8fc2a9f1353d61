-- Tollgate's SQLite schema, whole, at the latest version (SCHEMA_VERSION in
-- src/store/sqlite/mod.rs). It is applied to an empty database at start-up;
-- an older database is brought up to date by the upgrade scripts in
-- src/store/sqlite/upgrades/, and every version it reaches is recorded.
-- Times are Unix milliseconds. Amounts are in base units: milliseconds for
-- the *_seconds limit types, tokens for token_cnt.

CREATE TABLE schema_version (
    version    INTEGER NOT NULL,
    applied_at INTEGER NOT NULL
);

CREATE TABLE projects (
    id         INTEGER PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);

-- Only the SHA-256 of a key is kept.
CREATE TABLE api_keys (
    id         INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL REFERENCES projects (id),
    key_hash   BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);

-- A human is an end user of a project, named by the app's own identifier.
-- revocation_epoch grows with every revocation, so that sessions opened
-- before it can be told apart from those opened after.
CREATE TABLE humans (
    id               INTEGER PRIMARY KEY,
    project_id       INTEGER NOT NULL REFERENCES projects (id),
    external_id      TEXT NOT NULL,
    revocation_epoch INTEGER NOT NULL DEFAULT 0,
    created_at       INTEGER NOT NULL,
    UNIQUE (project_id, external_id)
);

-- One pool per human and limit type. balance is always the sum of the
-- pool's ledger rows. A pool with limited = 0 is metered but not enforced:
-- its balance runs below zero and is not shown as a limit. low_notified and
-- exhausted_notified say that the webhook events for falling below the
-- project's threshold, and for reaching zero, have fired since the balance
-- was last above the line, so that each fires once per crossing.
CREATE TABLE limits (
    human_id   INTEGER NOT NULL REFERENCES humans (id),
    limit_type TEXT NOT NULL
        CHECK (limit_type IN ('conversational_seconds', 'voice_synthesis_seconds', 'token_cnt')),
    balance    INTEGER NOT NULL,
    limited    INTEGER NOT NULL CHECK (limited IN (0, 1)),
    updated_at INTEGER NOT NULL,
    low_notified       INTEGER NOT NULL DEFAULT 0,
    exhausted_notified INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (human_id, limit_type)
) WITHOUT ROWID;

CREATE TABLE usage_tokens (
    id         INTEGER PRIMARY KEY,
    human_id   INTEGER NOT NULL REFERENCES humans (id),
    token_hash BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    revoked_at INTEGER
);

CREATE INDEX usage_tokens_by_human ON usage_tokens (human_id, created_at);

-- A realtime session. ended_at is NULL while it is open; charged (in
-- milliseconds) is written when it ends, from its ledger rows.
-- refund_floor is what the session had been charged when its pool was last
-- set to a value: time given back to a dead client never reaches below it,
-- so a refund cannot lift a pool above a value set after the client fell
-- silent. tracked is how much of its use usage.tracked webhook events have
-- announced: one a minute while it runs, and the rest when it ends.
CREATE TABLE sessions (
    id           INTEGER PRIMARY KEY,
    public_id    TEXT NOT NULL UNIQUE,
    human_id     INTEGER NOT NULL REFERENCES humans (id),
    kind         TEXT NOT NULL CHECK (kind IN ('conversational', 'voice_synthesis')),
    token_id     INTEGER REFERENCES usage_tokens (id),
    started_at   INTEGER NOT NULL,
    ended_at     INTEGER,
    end_reason   TEXT,
    charged      INTEGER NOT NULL DEFAULT 0,
    refund_floor INTEGER NOT NULL DEFAULT 0,
    tracked      INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX sessions_open_by_human ON sessions (human_id) WHERE ended_at IS NULL;

-- A chat completion. While it runs (ended_at NULL), reserved tokens of its
-- human's token_cnt are held: admission counts them as spent, so that
-- concurrent completions cannot together spend more than the pool holds.
-- When it ends, its usage becomes one debit in the ledger and the hold
-- goes back to 0. usage_source says where the counts came from: the
-- upstream's usage, or Tollgate's own tokenizer when the upstream gave none.
-- A completion a stopped server left running is charged prompt_estimate:
-- the upstream had the prompt, and what it answered was never seen.
CREATE TABLE completions (
    id                INTEGER PRIMARY KEY,
    public_id         TEXT NOT NULL UNIQUE,
    human_id          INTEGER NOT NULL REFERENCES humans (id),
    token_id          INTEGER REFERENCES usage_tokens (id),
    model             TEXT NOT NULL,
    reserved          INTEGER NOT NULL,
    started_at        INTEGER NOT NULL,
    ended_at          INTEGER,
    end_reason        TEXT,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    usage_source      TEXT CHECK (usage_source IN ('upstream', 'counted')),
    prompt_estimate   INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX completions_open_by_human ON completions (human_id) WHERE ended_at IS NULL;

-- Usage a backend measured itself and reported. The idempotency key is the
-- backend's own, unique within its project: a retry finds the first report
-- and is answered as it was. remaining is the pool's value right after the
-- report (NULL when the type is not limited for the human).
CREATE TABLE usage_reports (
    id              INTEGER PRIMARY KEY,
    project_id      INTEGER NOT NULL REFERENCES projects (id),
    idempotency_key TEXT NOT NULL,
    human_id        INTEGER NOT NULL REFERENCES humans (id),
    limit_type      TEXT NOT NULL,
    amount          INTEGER NOT NULL,
    metadata        TEXT,
    remaining       INTEGER,
    created_at      INTEGER NOT NULL,
    UNIQUE (project_id, idempotency_key)
);

-- Every change to a pool's balance. A grant comes from setting or raising
-- limits; a debit is a stretch of one session's use (the meter records an
-- open session once a minute and when its human's limits are read or
-- changed; a recording grows the session's latest row while that row is
-- under a minute old, and starts a new one after), one chat
-- completion, or one usage report; a refund gives back time a dead client
-- was charged for after its last frame. A row names at most one of the
-- session, completion or report it comes from.
CREATE TABLE ledger (
    id            INTEGER PRIMARY KEY,
    human_id      INTEGER NOT NULL REFERENCES humans (id),
    limit_type    TEXT NOT NULL,
    entry         TEXT NOT NULL CHECK (entry IN ('grant', 'debit', 'refund')),
    amount        INTEGER NOT NULL,
    session_id    INTEGER REFERENCES sessions (id),
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    completion_id INTEGER REFERENCES completions (id),
    report_id     INTEGER REFERENCES usage_reports (id)
);

CREATE INDEX ledger_by_pool ON ledger (human_id, limit_type);
CREATE INDEX ledger_by_session ON ledger (session_id) WHERE session_id IS NOT NULL;

-- A project's webhook endpoint. events is a JSON array of the event types
-- it wants (NULL: all); thresholds a JSON object of limit type to the
-- remaining value, in base units, below which "running low" fires. The
-- secret signs every delivery; after a rotation the previous one signs too,
-- until previous_until.
CREATE TABLE webhooks (
    project_id      INTEGER PRIMARY KEY REFERENCES projects (id),
    url             TEXT NOT NULL,
    events          TEXT,
    thresholds      TEXT,
    secret          TEXT NOT NULL,
    previous_secret TEXT,
    previous_until  INTEGER,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);

-- The outbox: an event is written in the same transaction as the change
-- that causes it, with the body it is delivered with, and waits here until
-- its endpoint takes it (delivered) or the retries run out (failed).
CREATE TABLE webhook_events (
    id              INTEGER PRIMARY KEY,
    public_id       TEXT NOT NULL UNIQUE,
    project_id      INTEGER NOT NULL REFERENCES projects (id),
    type            TEXT NOT NULL,
    body            TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER,
    last_error      TEXT,
    delivered_at    INTEGER
);

CREATE INDEX webhook_events_due ON webhook_events (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_events_by_project ON webhook_events (project_id, status, id);

-- The meter's clock: every transaction that records usage sets alive_at to
-- its time. An open session's usage reaches the ledger at least once a
-- minute, not at every tick; after a crash, each session the run left open
-- is charged from its last recorded usage up to alive_at, so that at most
-- one tick of usage goes unrecorded.
CREATE TABLE meter_clock (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    alive_at INTEGER NOT NULL
);

INSERT INTO meter_clock (id, alive_at) VALUES (1, 0);
