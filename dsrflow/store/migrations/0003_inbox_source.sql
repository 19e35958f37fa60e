-- CloudEvents ids are unique per source, not globally: two upstream apps may both send id "1".
-- The inbox remembers (source, id), so one app's event can never mask another's.
ALTER TABLE inbox ADD COLUMN source text NOT NULL DEFAULT '';
ALTER TABLE inbox DROP CONSTRAINT inbox_pkey;
ALTER TABLE inbox ADD PRIMARY KEY (consumer, source, event_id);
