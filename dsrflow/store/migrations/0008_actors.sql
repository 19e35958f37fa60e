-- Who may decide on a case: actors (a DPO, an operator, an admin) and their Ed25519 public keys.
-- A decision records the actor the channel established (a command token signed with one of the
-- actor's keys, or the CLI's configured credential), never a name the sender typed. Only public
-- keys are stored; an actor and a key are never deleted (timelines name them), only disabled or revoked.
CREATE TABLE actors (
    name         text        PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$'),
    role         text        NOT NULL CHECK (role IN ('dpo', 'operator', 'admin')),
    tenant       text        NOT NULL DEFAULT 'default' CHECK (tenant ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
    created_at   timestamptz NOT NULL DEFAULT now(),
    disabled_at  timestamptz
);

CREATE TABLE actor_keys (
    key_id      text        PRIMARY KEY CHECK (key_id ~ '^k_[0-9a-f]{16}$'),
    actor       text        NOT NULL REFERENCES actors (name),
    public_key  text        NOT NULL CHECK (public_key LIKE '-----BEGIN PUBLIC KEY-----%'),  -- SPKI PEM, Ed25519
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX actor_keys_actor ON actor_keys (actor);
-- A key serves one actor under one id: a revoked key cannot come back under a new id.
CREATE UNIQUE INDEX actor_keys_public_key ON actor_keys (public_key);
