-- The DPO lifecycle: tenants (controllers), the acknowledgement against its deadline, the internal
-- target, the deadline watcher's marks, reassigned tasks, and pseudonymised closed cases.

-- Every case, task and system belongs to one controller (tenant); one tenant, 'default', unless
-- dsrflow runs for several client companies (docs/tenants.md).
ALTER TABLE cases ADD COLUMN controller text NOT NULL DEFAULT 'default';
ALTER TABLE systems ADD COLUMN controller text NOT NULL DEFAULT 'default';
CREATE INDEX cases_controller_idx ON cases (controller, received_at DESC);
-- A request id is the requesting app's: two controllers' apps may both use "pc-1".
ALTER TABLE cases DROP CONSTRAINT cases_request_id_key;
CREATE UNIQUE INDEX cases_controller_request_id_key ON cases (controller, request_id);
CREATE INDEX cases_request_id_idx ON cases (request_id);

ALTER TABLE cases ADD COLUMN acknowledged_at timestamptz;   -- the subject was told the request arrived
ALTER TABLE cases ADD COLUMN target_at timestamptz;         -- the organisation's internal target, before due_at
ALTER TABLE cases ADD COLUMN warned_at timestamptz;         -- the watcher's deadline warning went out
ALTER TABLE cases ADD COLUMN target_passed_at timestamptz;  -- ... the internal target passed
ALTER TABLE cases ADD COLUMN overdue_at timestamptz;        -- ... the case went overdue
ALTER TABLE cases ADD COLUMN pseudonymised_at timestamptz;  -- identifiers, corrections and notes replaced
CREATE INDEX cases_open_due_idx ON cases (due_at) WHERE completed_at IS NULL;

-- subject: a data subject's request; controller: a client company leaving its processor (all its data)
ALTER TABLE cases ADD COLUMN scope text NOT NULL DEFAULT 'subject' CHECK (scope IN ('subject', 'controller'));

ALTER TABLE tasks ADD COLUMN assignee text;                 -- the person a manual task is assigned to

ALTER TABLE case_timeline DROP CONSTRAINT case_timeline_kind_check;
ALTER TABLE case_timeline ADD CONSTRAINT case_timeline_kind_check CHECK (kind IN (
    'received', 'duplicate_request', 'awaiting_verification', 'verified', 'no_systems_registered',
    'information_answered', 'tasks_dispatched', 'tasks_planned_late', 'manual_tasks_opened', 'systems_not_asked',
    'task_succeeded', 'task_not_found', 'task_retained', 'task_conflict', 'task_refused', 'task_failed',
    'task_retried', 'task_redispatched', 'task_stalled', 'manual_completed', 'manual_declined', 'task_skipped',
    'task_retried_by_dpo', 'reopened', 'restriction_lifted', 'deadline_extended', 'denied', 'held', 'released',
    'completed', 'failed',
    'outcome_updated',
    'acknowledged', 'deadline_warning', 'target_passed', 'deadline_overdue', 'task_reassigned', 'pseudonymised'));
