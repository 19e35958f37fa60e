-- The head of each case's hash chain, anchored outside case_timeline: in the case row (written in
-- the transaction that appends) and in every CaseUpdated event on the compacted dsr.cases.v1.
-- `dsrflow audit verify` compares the table against both, so a truncated table or a cut-off tail
-- shows, and so does rewriting the table and the case row together.
ALTER TABLE cases ADD COLUMN timeline_length integer NOT NULL DEFAULT 0;
ALTER TABLE cases ADD COLUMN timeline_head bytea;
UPDATE cases c SET timeline_length = h.position, timeline_head = h.hash
FROM (SELECT DISTINCT ON (case_id) case_id, position, hash FROM case_timeline
      ORDER BY case_id, position DESC) h
WHERE h.case_id = c.case_id;
