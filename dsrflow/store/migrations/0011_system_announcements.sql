-- Systems announce themselves (dsr.systems.v1, registry.SystemAnnounced); an administrator approves.
-- One row per system: the last announcement the coordinator read, and where it stands.
--   pending:  a new system, or a declaration unlike the one in force: waits for an administrator
--   approved: the announced declaration is the one in force (its digest is systems.digest)
--   refused:  it cannot take effect (the name belongs to another controller, say); see reason
-- The declaration in force stays in `systems` until a change is approved.
CREATE TABLE system_announcements (
    system         text        PRIMARY KEY CHECK (system ~ '^[a-z][a-z0-9_-]{0,62}$'),
    controller     text        NOT NULL,
    declaration    jsonb       NOT NULL,
    digest         text        NOT NULL CHECK (digest ~ '^[0-9a-f]{64}$'),
    state          text        NOT NULL CHECK (state IN ('pending', 'approved', 'refused')),
    reason         text,
    sdk_version    text        NOT NULL,
    version        text,
    instance       text        NOT NULL,
    started_at     timestamptz NOT NULL,
    first_seen_at  timestamptz NOT NULL DEFAULT now(),   -- first announcement of this digest
    last_seen_at   timestamptz NOT NULL DEFAULT now(),   -- the latest heartbeat (the worker's clock)
    signed_by      text                                   -- the system key that signed it, if any
);

-- The digest of the declaration in force, and who put it in force.
ALTER TABLE systems ADD COLUMN digest text;
ALTER TABLE systems ADD COLUMN approved_by text;
ALTER TABLE systems ADD COLUMN approved_at timestamptz;

-- Every administrator's decision on a system, kept: who approved which declaration, and when.
CREATE TABLE system_decisions (
    id          bigserial   PRIMARY KEY,
    system      text        NOT NULL,
    controller  text        NOT NULL,
    decision    text        NOT NULL CHECK (decision IN ('approved', 'declared', 'refused')),
    digest      text        NOT NULL,
    actor       text        NOT NULL,
    reason      text,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX system_decisions_system ON system_decisions (system, at);
