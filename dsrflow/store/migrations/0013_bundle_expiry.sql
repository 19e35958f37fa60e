-- Access bundles and the exports they were built from expire (DSRFLOW_BUNDLE_RETENTION after the case
-- finished): when they were deleted, so it is done once and the DPO sees it, with a timeline entry.

ALTER TABLE cases ADD COLUMN exports_deleted_at timestamptz;  -- the bundle and the systems' exports deleted
-- What the sweep looks for: finished cases with a bundle whose copies are not deleted yet.
CREATE INDEX cases_bundle_expiry_idx ON cases (completed_at)
    WHERE bundle IS NOT NULL AND exports_deleted_at IS NULL;

ALTER TABLE case_timeline DROP CONSTRAINT case_timeline_kind_check;
ALTER TABLE case_timeline ADD CONSTRAINT case_timeline_kind_check CHECK (kind IN (
    'received', 'duplicate_request', 'awaiting_verification', 'verified', 'no_systems_registered',
    'information_answered', 'tasks_dispatched', 'tasks_planned_late', 'manual_tasks_opened', 'systems_not_asked',
    'task_succeeded', 'task_not_found', 'task_retained', 'task_conflict', 'task_refused', 'task_failed',
    'task_retried', 'task_redispatched', 'task_stalled', 'manual_completed', 'manual_declined', 'task_skipped',
    'task_retried_by_dpo', 'reopened', 'restriction_lifted', 'deadline_extended', 'denied', 'held', 'released',
    'completed', 'failed',
    'outcome_updated',
    'acknowledged', 'deadline_warning', 'target_passed', 'deadline_overdue', 'task_reassigned', 'pseudonymised',
    'exports_expired'));
