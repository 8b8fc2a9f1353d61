-- The whole schema as version 1 had it, kept only so that the tests can
-- build a version-1 database and check that upgrading it gives what
-- schema.sql gives a new one.

-- Tollgate's SQLite schema. Applied once to an empty database at start-up,
-- which then records the schema version it was built with. Times are Unix
-- milliseconds. Amounts are in base units: milliseconds for the *_seconds
-- limit types, tokens for token_cnt.

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
-- its balance runs below zero and is not shown as a limit.
CREATE TABLE limits (
    human_id   INTEGER NOT NULL REFERENCES humans (id),
    limit_type TEXT NOT NULL
        CHECK (limit_type IN ('conversational_seconds', 'voice_synthesis_seconds', 'token_cnt')),
    balance    INTEGER NOT NULL,
    limited    INTEGER NOT NULL CHECK (limited IN (0, 1)),
    updated_at INTEGER NOT NULL,
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
-- silent.
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
    refund_floor INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX sessions_open_by_human ON sessions (human_id) WHERE ended_at IS NULL;

-- Every change to a pool's balance. A grant comes from setting or raising
-- limits; a debit is one session's use over at most a minute (the row grows
-- with each tick of that minute, then a new row starts); a refund gives back
-- time a dead client was charged for after its last frame.
CREATE TABLE ledger (
    id         INTEGER PRIMARY KEY,
    human_id   INTEGER NOT NULL REFERENCES humans (id),
    limit_type TEXT NOT NULL,
    entry      TEXT NOT NULL CHECK (entry IN ('grant', 'debit', 'refund')),
    amount     INTEGER NOT NULL,
    session_id INTEGER REFERENCES sessions (id),
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE INDEX ledger_by_pool ON ledger (human_id, limit_type);
CREATE INDEX ledger_by_session ON ledger (session_id) WHERE session_id IS NOT NULL;
