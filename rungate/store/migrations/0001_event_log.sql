-- The event log: the only source of truth. Append-only (triggers refuse UPDATE and DELETE), a global
-- gapless position, a per-stream version guarded by UNIQUE (stream, version), an idempotency key so a
-- retried command is not doubled, and a SHA-256 hash chain (prev_hash, hash) that makes tampering visible.
CREATE TABLE IF NOT EXISTS events (
    position INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    stream TEXT NOT NULL,
    version INTEGER NOT NULL,
    type TEXT NOT NULL,
    schema_version INTEGER NOT NULL,
    data TEXT NOT NULL,
    metadata TEXT NOT NULL,
    recorded_at TEXT NOT NULL,
    idempotency_key TEXT,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    UNIQUE (stream, version)
) STRICT;
CREATE UNIQUE INDEX IF NOT EXISTS events_idempotency ON events (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
-- INSERT OR REPLACE deletes the conflicting row without firing DELETE triggers: refuse any insert that
-- would collide with a stored event, so a row can never be overwritten that way either.
CREATE TRIGGER IF NOT EXISTS events_no_replace BEFORE INSERT ON events
    WHEN EXISTS (SELECT 1 FROM events WHERE position = NEW.position OR event_id = NEW.event_id
                 OR (stream = NEW.stream AND version = NEW.version)
                 OR (NEW.idempotency_key IS NOT NULL AND idempotency_key = NEW.idempotency_key))
    BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
-- The head of the chain, rewritten in every write transaction: `verify` compares the log's last event with it,
-- so events cut off the end are noticed too (a forger would have to rewrite this row as well).
CREATE TABLE IF NOT EXISTS chain_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    position INTEGER NOT NULL,
    hash TEXT NOT NULL
) STRICT;
