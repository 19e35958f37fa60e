-- Receipts signed by their system (dsrflow/signing.py): the public keys a system's worker signs
-- its receipts with. A system with a key has every receipt checked against its unrevoked keys;
-- the private key stays with the worker. Keys are revoked, never deleted or reused.
CREATE TABLE system_keys (
    key_id      text        PRIMARY KEY CHECK (key_id ~ '^k_[0-9a-f]{16}$'),
    system      text        NOT NULL CHECK (system ~ '^[a-z][a-z0-9_-]{0,62}$'),
    public_key  text        NOT NULL CHECK (public_key LIKE '-----BEGIN PUBLIC KEY-----%'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX system_keys_system ON system_keys (system) WHERE revoked_at IS NULL;
CREATE UNIQUE INDEX system_keys_public_key ON system_keys (public_key);
