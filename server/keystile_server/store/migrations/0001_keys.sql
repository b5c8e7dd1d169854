-- 0001: the keys table, its listing index, and the server-wide secret that signs page tokens.
CREATE TABLE keystile.keys (
    id uuid PRIMARY KEY,
    owner_id text NOT NULL,
    name text NOT NULL,
    prefix text NOT NULL,
    -- SHA-256 of the whole secret; the secret itself is never stored.
    secret_hash bytea NOT NULL,
    secret_hint text NOT NULL,
    scopes text[] NOT NULL DEFAULT '{}',
    resources text[] NOT NULL DEFAULT '{}',
    metadata jsonb NOT NULL DEFAULT '{}',
    rate_limit_per_minute bigint NOT NULL DEFAULT 0 CHECK (rate_limit_per_minute >= 0),
    create_time timestamptz NOT NULL DEFAULT now(),
    expire_time timestamptz,
    revoke_time timestamptz,
    revoke_reason text,
    last_used_time timestamptz,
    created_by text,
    CONSTRAINT keys_secret_hash_length CHECK (octet_length(secret_hash) = 32)
);

CREATE UNIQUE INDEX keys_secret_hash_key ON keystile.keys (secret_hash);

-- ListKeys: one owner's keys, newest first, keyset-paginated on (create_time, id).
CREATE INDEX keys_owner_listing_idx ON keystile.keys (owner_id, create_time DESC, id DESC);

CREATE TABLE keystile.server_secrets (
    name text PRIMARY KEY,
    value bytea NOT NULL
);

-- gen_random_uuid() draws from the server's strong random source; two of them give 244 random bits.
INSERT INTO keystile.server_secrets (name, value)
VALUES (
    'page_token_hmac',
    decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex')
);
