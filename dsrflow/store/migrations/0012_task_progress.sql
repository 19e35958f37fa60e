-- Progress of long tasks (dsrflow.task.progress.v1, sent by workers on dsr.receipts.v1 while a task
-- runs): the latest progress reported for the task's current attempt. The sweep counts a task's
-- wait for its receipt from the later of dispatched_at and progress_at; a re-dispatch clears both.
-- No timeline entry is written per progress: the timeline stays about decisions and results.
ALTER TABLE tasks ADD COLUMN progress_at timestamptz;  -- when the coordinator recorded the latest progress
ALTER TABLE tasks ADD COLUMN progress jsonb;           -- {attempt, seq, done, total, note} of that progress
ALTER TABLE tasks ADD CONSTRAINT tasks_progress_check CHECK ((progress IS NULL) = (progress_at IS NULL));
