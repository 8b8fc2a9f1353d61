-- Version 3 to 4: the meter's clock (see schema.sql), which lets the meter
-- record an open session's usage once a minute instead of at every tick.
-- Sessions a version-3 run left open were recorded at every tick, so a
-- clock at 0 charges them nothing more at the next start.

CREATE TABLE meter_clock (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    alive_at INTEGER NOT NULL
);

INSERT INTO meter_clock (id, alive_at) VALUES (1, 0);
