-- The DPO skips or retries a task; retrying a task of a finished case opens the case again.
ALTER TABLE case_timeline DROP CONSTRAINT case_timeline_kind_check;
ALTER TABLE case_timeline ADD CONSTRAINT case_timeline_kind_check CHECK (kind IN (
    'received', 'duplicate_request', 'awaiting_verification', 'verified', 'no_systems_registered',
    'information_answered', 'tasks_dispatched', 'tasks_planned_late', 'manual_tasks_opened', 'systems_not_asked',
    'task_succeeded', 'task_not_found', 'task_retained', 'task_conflict', 'task_refused', 'task_failed',
    'task_retried', 'task_redispatched', 'task_stalled', 'manual_completed', 'manual_declined', 'task_skipped',
    'task_retried_by_dpo', 'reopened', 'restriction_lifted', 'completed', 'failed', 'outcome_updated'));
