-- 0002: announce every change to a key on the keystile_key_events channel, inside the changing
-- transaction, so that caches evict exactly when the change commits (and never for a rolled-back
-- one). Triggers rather than a NOTIFY in each statement: a change made by hand in psql, or by a
-- future RPC, invalidates caches too.
--
-- Payload: "<hex SHA-256 of the secret> <epoch seconds>". The hash is the cache index (and useless
-- to anyone who does not already hold the secret); the time of the change lets each listener
-- measure how long the event took to reach it. A statement that changes more than 1000 keys (a
-- bulk import) sends one "* <epoch seconds>" instead, which tells every cache to drop everything:
-- cheaper for all than a million single events.
--
-- Statement-level triggers with transition tables, one per event (PostgreSQL allows transition
-- tables only on single-event triggers), all calling the same function.
CREATE FUNCTION keystile.notify_key_events() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    sent text := extract(epoch FROM clock_timestamp())::text;
    hashes bytea[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(secret_hash) INTO hashes FROM (SELECT secret_hash FROM new_rows LIMIT 1001) AS n;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(secret_hash) INTO hashes FROM (SELECT secret_hash FROM old_rows LIMIT 1001) AS o;
    ELSE
        -- last_used_time is bookkeeping that no cached answer depends on: writing it is not an event.
        SELECT array_agg(h) INTO hashes FROM (
            SELECT h FROM (
                SELECT o.secret_hash AS old_hash, n.secret_hash AS new_hash
                  FROM old_rows AS o JOIN new_rows AS n ON n.id = o.id
                 WHERE (to_jsonb(o) - 'last_used_time') IS DISTINCT FROM (to_jsonb(n) - 'last_used_time')
            ) AS changed
            CROSS JOIN LATERAL (SELECT DISTINCT unnest(ARRAY[old_hash, new_hash]) AS h) AS both_hashes
            LIMIT 1001
        ) AS u;
    END IF;
    IF hashes IS NULL THEN
        RETURN NULL;
    END IF;
    IF cardinality(hashes) > 1000 THEN
        PERFORM pg_notify('keystile_key_events', '* ' || sent);
    ELSE
        PERFORM pg_notify('keystile_key_events', encode(h, 'hex') || ' ' || sent) FROM unnest(hashes) AS h;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER keys_inserted_notify AFTER INSERT ON keystile.keys
REFERENCING NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION keystile.notify_key_events();

CREATE TRIGGER keys_updated_notify AFTER UPDATE ON keystile.keys
REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION keystile.notify_key_events();

CREATE TRIGGER keys_deleted_notify AFTER DELETE ON keystile.keys
REFERENCING OLD TABLE AS old_rows
FOR EACH STATEMENT EXECUTE FUNCTION keystile.notify_key_events();
