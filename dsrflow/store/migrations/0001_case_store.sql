-- dsrflow case store, v1: cases, tasks, receipts, hash-chained timeline, outbox, inbox, registry.

CREATE TABLE systems (
    name              text PRIMARY KEY,
    identifier_types  text[]      NOT NULL,
    categories        text[]      NOT NULL DEFAULT '{}',
    actions           text[]      NOT NULL,
    retention         jsonb       NOT NULL DEFAULT '[]',
    description       text,
    active            boolean     NOT NULL DEFAULT true,
    registered_at     timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE cases (
    case_id        uuid PRIMARY KEY,
    request_id     text        NOT NULL UNIQUE,
    request_event  text        NOT NULL,
    right_name     text        NOT NULL,
    jurisdiction   text        NOT NULL,
    status         text        NOT NULL,
    subject        jsonb       NOT NULL,          -- identifiers as submitted: personal data, stays here
    verified       boolean     NOT NULL DEFAULT false,
    channel        text,
    changes        jsonb,
    purposes       jsonb,
    received_at    timestamptz NOT NULL,
    ack_due_at     timestamptz NOT NULL,
    due_at         timestamptz NOT NULL,
    completed_at   timestamptz,
    outcome        jsonb,
    bundle         jsonb,                         -- Artifact of the access bundle
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cases_status_idx ON cases (status, due_at);
CREATE INDEX cases_right_idx ON cases (right_name, received_at DESC);
CREATE INDEX cases_received_idx ON cases (received_at DESC);

CREATE TABLE tasks (
    task_id       uuid PRIMARY KEY,
    case_id       uuid        NOT NULL REFERENCES cases (case_id),
    system        text        NOT NULL REFERENCES systems (name),
    action        text        NOT NULL,
    status        text        NOT NULL,
    attempt       integer     NOT NULL DEFAULT 1,
    dispatched_at timestamptz,
    completed_at  timestamptz,
    result        jsonb,                          -- counts, categories, retained, artifacts of the last receipt
    error         text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (case_id, system)
);
CREATE INDEX tasks_open_idx ON tasks (status, dispatched_at) WHERE status IN ('pending', 'dispatched');

CREATE TABLE receipts (
    event_id     text PRIMARY KEY,
    task_id      uuid        NOT NULL REFERENCES tasks (task_id),
    case_id      uuid        NOT NULL REFERENCES cases (case_id),
    system       text        NOT NULL,
    attempt      integer     NOT NULL,
    status       text        NOT NULL,
    body         jsonb       NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX receipts_case_idx ON receipts (case_id);

-- Append-only, hash-chained per case: hash = sha256(prev_hash || canonical entry).
CREATE TABLE case_timeline (
    seq        bigserial PRIMARY KEY,
    case_id    uuid        NOT NULL REFERENCES cases (case_id),
    position   integer     NOT NULL,
    at         timestamptz NOT NULL,
    kind       text        NOT NULL,
    detail     jsonb       NOT NULL DEFAULT '{}',
    prev_hash  bytea       NOT NULL,
    hash       bytea       NOT NULL,
    UNIQUE (case_id, position)
);

CREATE FUNCTION case_timeline_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'case_timeline is append-only';
END $$;
CREATE TRIGGER case_timeline_no_update BEFORE UPDATE OR DELETE ON case_timeline
    FOR EACH ROW EXECUTE FUNCTION case_timeline_append_only();

CREATE TABLE outbox (
    id         bigserial PRIMARY KEY,
    topic      text        NOT NULL,
    key        bytea,
    value      bytea       NOT NULL,
    headers    jsonb       NOT NULL,              -- [[name, base64 value], ...]
    created_at timestamptz NOT NULL DEFAULT now(),
    sent_at    timestamptz
);
CREATE INDEX outbox_unsent_idx ON outbox (id) WHERE sent_at IS NULL;

CREATE TABLE inbox (
    consumer     text        NOT NULL,
    event_id     text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
