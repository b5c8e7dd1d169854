-- 0004: the key lifecycle (disable, roll, cascade, delete, admin views) and the audit trail.

-- disable_time is set while a key is switched off (reversibly: UpdateKey of `disabled`).
-- replaces / replaced_by link a key to the key it was rolled from / into (RollKey), and grant_id
-- names the first key of that lineage: every secret rolled from one key spends the same rate-limit
-- counters and the same credits (kept under the grant's id), so a roll's grace period never
-- doubles a limit.
ALTER TABLE keystile.keys
    ADD COLUMN disable_time timestamptz,
    ADD COLUMN replaces uuid,
    ADD COLUMN replaced_by uuid,
    ADD COLUMN grant_id uuid;

-- Credits belong to a grant, which outlives the key that started it (DeleteKey removes a grant's
-- credits with its last key).
ALTER TABLE keystile.key_credits DROP CONSTRAINT key_credits_key_id_fkey;

-- Cascade revocation walks created_by (a key id as text, or "bootstrap" / "static-admin"), and
-- ListKeys filters by it; admins list across owners and look keys up by the hint a log shows.
CREATE INDEX keys_created_by_idx ON keystile.keys (created_by, create_time DESC, id DESC);
CREATE INDEX keys_secret_hint_idx ON keystile.keys (secret_hint);
CREATE INDEX keys_listing_all_idx ON keystile.keys (create_time DESC, id DESC);
-- Retention purges keys revoked or expired long ago.
CREATE INDEX keys_revoke_time_idx ON keystile.keys (revoke_time) WHERE revoke_time IS NOT NULL;
CREATE INDEX keys_expire_time_idx ON keystile.keys (expire_time) WHERE expire_time IS NOT NULL;

-- One row per management action, written in the transaction that makes the change. Rows are
-- never updated; only the retention setting deletes them (the oldest first). `changes` maps each
-- changed field to {"old": ..., "new": ...}: never a secret or a hash.
CREATE TABLE keystile.audit_events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_time timestamptz NOT NULL DEFAULT now(),
    action text NOT NULL,
    actor text NOT NULL,
    key_id uuid,
    owner_id text,
    changes jsonb NOT NULL DEFAULT '{}'
);

CREATE INDEX audit_events_owner_idx ON keystile.audit_events (owner_id, id DESC);
CREATE INDEX audit_events_key_idx ON keystile.audit_events (key_id, id DESC);
CREATE INDEX audit_events_actor_idx ON keystile.audit_events (actor, id DESC);
CREATE INDEX audit_events_time_idx ON keystile.audit_events (event_time);

CREATE FUNCTION keystile.audit_events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'keystile.audit_events is append-only';
END;
$$;

CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON keystile.audit_events
FOR EACH ROW EXECUTE FUNCTION keystile.audit_events_append_only();
