-- The relay sets aside a row the broker refuses for good (too large, a topic that never appears),
-- so one bad row cannot hold up every event behind it. Set-aside rows stay here, with their error,
-- for an operator to fix and release:
--   UPDATE outbox SET failed_at = NULL, attempts = 0, first_failed_at = NULL WHERE id = ...;
-- (a released row is published after newer events for the same key).
ALTER TABLE outbox ADD COLUMN attempts integer NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN first_failed_at timestamptz;
ALTER TABLE outbox ADD COLUMN error text;
ALTER TABLE outbox ADD COLUMN failed_at timestamptz;

DROP INDEX outbox_unsent_idx;
CREATE INDEX outbox_unsent_idx ON outbox (id) WHERE sent_at IS NULL AND failed_at IS NULL;
CREATE INDEX outbox_failed_idx ON outbox (failed_at) WHERE failed_at IS NOT NULL;
