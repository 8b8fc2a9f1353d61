-- Tollgate's PostgreSQL schema, whole, version 5 (POSTGRES_SCHEMA_VERSION in
-- src/store/postgres/mod.rs). It has the same tables, columns and meaning as
-- schema.sql at its version 4 (whose comments say what each holds); it
-- differs only where the two databases do: BIGINT and BOOLEAN columns, BYTEA hashes,
-- identity columns for the ids, and where several servers share one
-- database: instances (see there) in place of meter_clock, and the
-- instance_id of sessions and completions.
-- It is applied to an empty database at start-up, in one transaction. The
-- first PostgreSQL schema was version 4; what version 5 added comes after the
-- line "Added by version 5" below, and that part alone is applied to a
-- database of version 4 (which also had a table meter_clock, left unused).

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

-- Added by version 5.

-- Every run of a server on the database, in place of SQLite's one
-- meter_clock row. Each run has a random id, and its meter writes its row in
-- every one of its commits (one a tick at least): alive_at is the meter's
-- clock (schema.sql's meter_clock.alive_at: what the run is known to have
-- metered up to, on its own clock), seen_at the same moment on the
-- database's clock, which every server reads alike, and last_batch the id of
-- its last usage batch: a COMMIT whose answer is lost leaves the meter
-- unsure whether it counted, and the batch it sends again is recognised and
-- not applied twice (SQLite's commits are never lost that way, and it keeps
-- the id in memory). up_since is the database's time since which the run
-- has committed at least once every two ticks: another run is taken as lost
-- only once it has been silent for three of its ticks while this one was
-- up, so that an outage of the database, which silences every run, makes
-- none of them close out the others.
--
-- A run silent that long is closed out by another: its open sessions are
-- ended (instance_lost) with their usage as of its last commit, its running
-- completions too, and ended_at is set with lost. A run that stops cleanly
-- sets ended_at itself. Either way it records nothing more: every batch,
-- admission and completion of a run checks first that its row has no
-- ended_at.
CREATE TABLE IF NOT EXISTS instances (
    id          BIGINT PRIMARY KEY,
    started_at  BIGINT NOT NULL,
    tick_millis BIGINT NOT NULL,
    alive_at    BIGINT NOT NULL,
    seen_at     BIGINT NOT NULL,
    up_since    BIGINT NOT NULL,
    last_batch  BIGINT,
    ended_at    BIGINT,
    lost        BOOLEAN NOT NULL DEFAULT FALSE
);

-- The run metering a session, and the run relaying a completion
-- (instances.id); none for those of a store opened with no run.
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS instance_id BIGINT;
ALTER TABLE completions ADD COLUMN IF NOT EXISTS instance_id BIGINT;

CREATE INDEX IF NOT EXISTS sessions_open_by_instance
    ON sessions (instance_id) WHERE ended_at IS NULL;
CREATE INDEX IF NOT EXISTS completions_open_by_instance
    ON completions (instance_id) WHERE ended_at IS NULL;
