-- A denial (its ground in the outcome). Holds (legal hold, suspected fraud). One extension of a case's deadline, as the jurisdiction allows: the latest date it may reach is
-- recorded at intake; the DPO's extension keeps the original due date and its reason beside it.
ALTER TABLE cases ADD COLUMN max_extension_until timestamptz;
ALTER TABLE cases ADD COLUMN original_due_at timestamptz;
ALTER TABLE cases ADD COLUMN extension jsonb;          -- {by, reason, at}
ALTER TABLE cases ADD COLUMN opened jsonb;             -- a case the DPO opened: {by, why} (why stays out of the timeline)
ALTER TABLE cases ADD COLUMN hold jsonb;               -- {kind, reason, by, at, resumes}: on_hold until released
ALTER TABLE case_timeline DROP CONSTRAINT case_timeline_kind_check;
ALTER TABLE case_timeline ADD CONSTRAINT case_timeline_kind_check CHECK (kind IN (
    'received', 'duplicate_request', 'awaiting_verification', 'verified', 'no_systems_registered',
    'information_answered', 'tasks_dispatched', 'tasks_planned_late', 'manual_tasks_opened', 'systems_not_asked',
    'task_succeeded', 'task_not_found', 'task_retained', 'task_conflict', 'task_refused', 'task_failed',
    'task_retried', 'task_redispatched', 'task_stalled', 'manual_completed', 'manual_declined', 'task_skipped',
    'task_retried_by_dpo', 'reopened', 'restriction_lifted', 'deadline_extended', 'denied', 'held', 'released',
    'completed', 'failed',
    'outcome_updated'));
