-- Version 2 to 3: webhooks. A project's endpoint, the outbox of events
-- waiting for it, and per pool whether its "running low" and "exhausted"
-- events have fired since the value was last above the line.

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

ALTER TABLE limits ADD COLUMN low_notified INTEGER NOT NULL DEFAULT 0;
ALTER TABLE limits ADD COLUMN exhausted_notified INTEGER NOT NULL DEFAULT 0;
-- How much of a session's use its usage.tracked events have announced, so
-- that the event at its end announces the rest.
ALTER TABLE sessions ADD COLUMN tracked INTEGER NOT NULL DEFAULT 0;

-- What a completion's prompt was estimated at: what it is charged should
-- the server stop before its answer's usage is known.
ALTER TABLE completions ADD COLUMN prompt_estimate INTEGER NOT NULL DEFAULT 0;
