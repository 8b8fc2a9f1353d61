-- Version 1 to 2: chat completions and usage reports, and the ledger
-- columns that name them. Columns added to the ledger go last, where
-- schema.sql also has them, so an upgraded database and a new one match.

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
    usage_source      TEXT CHECK (usage_source IN ('upstream', 'counted'))
);

CREATE INDEX completions_open_by_human ON completions (human_id) WHERE ended_at IS NULL;

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

ALTER TABLE ledger ADD COLUMN completion_id INTEGER REFERENCES completions (id);
ALTER TABLE ledger ADD COLUMN report_id INTEGER REFERENCES usage_reports (id);
