-- Outcomes: every right, manual tasks, per-identifier verification, representatives, lasting effects,
-- whole system declarations, and CHECK constraints on the statuses the code's enums name.

ALTER TABLE systems ADD COLUMN declaration jsonb NOT NULL DEFAULT '{}';

ALTER TABLE cases ADD COLUMN verification jsonb;      -- [{identifier, method, verified_by, verified_at}]
ALTER TABLE cases ADD COLUMN requester jsonb;         -- who asked, when not the subject (agent, guardian)
ALTER TABLE cases ADD COLUMN lifted_at timestamptz;   -- a lasting effect (restriction, ...) lifted
-- Systems the case's planning has looked at (asked or not): a system that registers later is
-- planned for the open cases, and the lasting effects in force, that have not considered it yet.
ALTER TABLE cases ADD COLUMN considered text[] NOT NULL DEFAULT '{}';
-- Cases opened before this migration were planned against the systems registered by then.
UPDATE cases c SET considered = coalesce((SELECT array_agg(DISTINCT s) FROM (
    SELECT t.system AS s FROM tasks t WHERE t.case_id = c.case_id
    UNION SELECT y.name FROM systems y WHERE y.registered_at <= c.received_at) known), '{}');
ALTER TABLE cases ADD CONSTRAINT cases_status_check CHECK (status IN (
    'received', 'awaiting_verification', 'in_progress', 'on_hold', 'completed', 'completed_with_exceptions',
    'denied', 'failed'));

ALTER TABLE tasks ADD COLUMN kind text NOT NULL DEFAULT 'worker';
ALTER TABLE tasks ADD COLUMN reason text;             -- why a person must act (manual tasks)
ALTER TABLE tasks ADD COLUMN changes jsonb;           -- rectification: the corrections this system holds
ALTER TABLE tasks ADD COLUMN decided_by text;         -- who completed, declined or skipped it
ALTER TABLE tasks ADD COLUMN note text;
ALTER TABLE tasks ADD CONSTRAINT tasks_kind_check CHECK (kind IN ('worker', 'manual'));
ALTER TABLE tasks ADD CONSTRAINT tasks_status_check CHECK (status IN (
    'pending', 'dispatched', 'succeeded', 'not_found', 'retained', 'conflict', 'refused', 'failed', 'stalled',
    'manual', 'skipped'));
-- Lifting a restriction sends a second task to the same system on the same case.
ALTER TABLE tasks DROP CONSTRAINT tasks_case_id_system_key;
ALTER TABLE tasks ADD CONSTRAINT tasks_case_system_action_key UNIQUE (case_id, system, action);
CREATE INDEX tasks_manual_idx ON tasks (case_id) WHERE status = 'manual';

ALTER TABLE case_timeline ADD CONSTRAINT case_timeline_kind_check CHECK (kind IN (
    'received', 'duplicate_request', 'awaiting_verification', 'verified', 'no_systems_registered',
    'information_answered', 'tasks_dispatched', 'tasks_planned_late', 'manual_tasks_opened', 'systems_not_asked',
    'task_succeeded', 'task_not_found', 'task_retained', 'task_conflict', 'task_refused', 'task_failed',
    'task_retried', 'task_redispatched', 'task_stalled', 'manual_completed', 'manual_declined',
    'restriction_lifted', 'completed', 'failed', 'outcome_updated'));
