-- Tollgate's PostgreSQL schema, whole. It has the same tables, columns and
-- meaning as schema.sql (whose comments say what each holds) and records the
-- same version (SCHEMA_VERSION in src/store/sqlite/mod.rs); it differs only
-- where the two databases do: BIGINT and BOOLEAN columns, BYTEA hashes,
-- identity columns for the ids, and meter_clock's last_batch (see there).
-- It is applied to an empty database at start-up, in one transaction. There
-- are no upgrade scripts yet: the first PostgreSQL schema is version 4.

CREATE TABLE schema_version (
    version    BIGINT NOT NULL,
    applied_at BIGINT NOT NULL
);

CREATE TABLE projects (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project_id BIGINT NOT NULL REFERENCES projects (id),
    key_hash   BYTEA NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

CREATE TABLE humans (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project_id       BIGINT NOT NULL REFERENCES projects (id),
    external_id      TEXT NOT NULL,
    revocation_epoch BIGINT NOT NULL DEFAULT 0,
    created_at       BIGINT NOT NULL,
    UNIQUE (project_id, external_id)
);

CREATE TABLE limits (
    human_id   BIGINT NOT NULL REFERENCES humans (id),
    limit_type TEXT NOT NULL
        CHECK (limit_type IN ('conversational_seconds', 'voice_synthesis_seconds', 'token_cnt')),
    balance    BIGINT NOT NULL,
    limited    BOOLEAN NOT NULL,
    updated_at BIGINT NOT NULL,
    low_notified       BOOLEAN NOT NULL DEFAULT FALSE,
    exhausted_notified BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (human_id, limit_type)
);

CREATE TABLE usage_tokens (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    human_id   BIGINT NOT NULL REFERENCES humans (id),
    token_hash BYTEA NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT
);

CREATE INDEX usage_tokens_by_human ON usage_tokens (human_id, created_at);

CREATE TABLE sessions (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    public_id    TEXT NOT NULL UNIQUE,
    human_id     BIGINT NOT NULL REFERENCES humans (id),
    kind         TEXT NOT NULL CHECK (kind IN ('conversational', 'voice_synthesis')),
    token_id     BIGINT REFERENCES usage_tokens (id),
    started_at   BIGINT NOT NULL,
    ended_at     BIGINT,
    end_reason   TEXT,
    charged      BIGINT NOT NULL DEFAULT 0,
    refund_floor BIGINT NOT NULL DEFAULT 0,
    tracked      BIGINT NOT NULL DEFAULT 0
);

CREATE INDEX sessions_open_by_human ON sessions (human_id) WHERE ended_at IS NULL;

CREATE TABLE completions (
    id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    public_id         TEXT NOT NULL UNIQUE,
    human_id          BIGINT NOT NULL REFERENCES humans (id),
    token_id          BIGINT REFERENCES usage_tokens (id),
    model             TEXT NOT NULL,
    reserved          BIGINT NOT NULL,
    started_at        BIGINT NOT NULL,
    ended_at          BIGINT,
    end_reason        TEXT,
    prompt_tokens     BIGINT,
    completion_tokens BIGINT,
    usage_source      TEXT CHECK (usage_source IN ('upstream', 'counted')),
    prompt_estimate   BIGINT NOT NULL DEFAULT 0
);

CREATE INDEX completions_open_by_human ON completions (human_id) WHERE ended_at IS NULL;

CREATE TABLE usage_reports (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project_id      BIGINT NOT NULL REFERENCES projects (id),
    idempotency_key TEXT NOT NULL,
    human_id        BIGINT NOT NULL REFERENCES humans (id),
    limit_type      TEXT NOT NULL,
    amount          BIGINT NOT NULL,
    metadata        TEXT,
    remaining       BIGINT,
    created_at      BIGINT NOT NULL,
    UNIQUE (project_id, idempotency_key)
);

CREATE TABLE ledger (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    human_id      BIGINT NOT NULL REFERENCES humans (id),
    limit_type    TEXT NOT NULL,
    entry         TEXT NOT NULL CHECK (entry IN ('grant', 'debit', 'refund')),
    amount        BIGINT NOT NULL,
    session_id    BIGINT REFERENCES sessions (id),
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    completion_id BIGINT REFERENCES completions (id),
    report_id     BIGINT REFERENCES usage_reports (id)
);

CREATE INDEX ledger_by_pool ON ledger (human_id, limit_type);
CREATE INDEX ledger_by_session ON ledger (session_id) WHERE session_id IS NOT NULL;

CREATE TABLE webhooks (
    project_id      BIGINT PRIMARY KEY REFERENCES projects (id),
    url             TEXT NOT NULL,
    events          TEXT,
    thresholds      TEXT,
    secret          TEXT NOT NULL,
    previous_secret TEXT,
    previous_until  BIGINT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);

CREATE TABLE webhook_events (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    public_id       TEXT NOT NULL UNIQUE,
    project_id      BIGINT NOT NULL REFERENCES projects (id),
    type            TEXT NOT NULL,
    body            TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT,
    last_error      TEXT,
    delivered_at    BIGINT
);

CREATE INDEX webhook_events_due ON webhook_events (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_events_by_project ON webhook_events (project_id, status, id);

-- Beside schema.sql's columns, meter_clock holds the id of the last usage
-- batch committed (last_batch), written in that batch's transaction: a
-- COMMIT whose answer is lost leaves the meter unsure whether it counted,
-- and the batch it then sends again is recognised and not applied twice.
-- SQLite's commits are never lost that way, and it keeps the id in memory.
-- It also holds the random id of the server that last took the database's
-- lock (owner), written by that server on the connection holding the lock;
-- every batch checks it is still its own, so that a server that lost the
-- lock to another no longer records usage.
CREATE TABLE meter_clock (
    id         BIGINT PRIMARY KEY CHECK (id = 1),
    alive_at   BIGINT NOT NULL,
    last_batch BIGINT,
    owner      BIGINT
);

INSERT INTO meter_clock (id, alive_at) VALUES (1, 0);
