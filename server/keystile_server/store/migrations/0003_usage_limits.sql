-- 0003: usage limits: rate limits and credits on keys, owner policies, and the lease that hands
-- units out to server processes and caching clients. docs/LIMITS.md explains the design; this
-- file is its reference implementation.

-- A key's rate limits: [{"name": text, "limit": n, "window_ms": n, "burst": n}], and its credit
-- terms ({"refill_amount": n, "refill": "daily" | "monthly" | null}, NULL for a key without
-- credits). Both are part of the key's snapshot, so changing them is a key event (0002's trigger).
ALTER TABLE keystile.keys
    ADD COLUMN limits jsonb NOT NULL DEFAULT '[]',
    ADD COLUMN credit_terms jsonb;

-- The credit balance lives apart from the key: spending it must not announce a key change.
CREATE TABLE keystile.key_credits (
    key_id uuid PRIMARY KEY REFERENCES keystile.keys (id) ON DELETE CASCADE,
    remaining bigint NOT NULL CHECK (remaining >= 0),
    refill_amount bigint NOT NULL DEFAULT 0 CHECK (refill_amount >= 0),
    refill text CHECK (refill IN ('daily', 'monthly')),
    -- The start of the refill period the balance belongs to.
    refilled_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE keystile.owner_policies (
    owner_id text PRIMARY KEY,
    max_active_keys integer NOT NULL DEFAULT 0 CHECK (max_active_keys >= 0),
    max_key_lifetime_ms bigint CHECK (max_key_lifetime_ms > 0),
    -- Rate limits shared by all of the owner's keys, in the same shape as keys.limits.
    shared_limits jsonb NOT NULL DEFAULT '[]',
    update_time timestamptz NOT NULL DEFAULT now()
);

-- Units leased per counter (one rate limit of one key or owner), by the slot in which they may
-- last be spent. A slot is 1/200 of the counter's window (at least 5 ms).
CREATE TABLE keystile.usage_slots (
    counter text NOT NULL,
    slot bigint NOT NULL,
    used bigint NOT NULL,
    PRIMARY KEY (counter, slot)
);

-- Announce key changes exactly as 0002's trigger does, for changes made outside keystile.keys.
CREATE FUNCTION keystile.announce_keys(hashes bytea[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    sent text := extract(epoch FROM clock_timestamp())::text;
BEGIN
    IF hashes IS NULL OR cardinality(hashes) = 0 THEN
        RETURN;
    END IF;
    IF cardinality(hashes) > 1000 THEN
        PERFORM pg_notify('keystile_key_events', '* ' || sent);
    ELSE
        PERFORM pg_notify('keystile_key_events', encode(h, 'hex') || ' ' || sent) FROM unnest(hashes) AS h;
    END IF;
END;
$$;

-- An owner's policy is part of every one of its keys' snapshots (their shared limits).
CREATE FUNCTION keystile.notify_owner_policy() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    owner text := CASE WHEN TG_OP = 'DELETE' THEN OLD.owner_id ELSE NEW.owner_id END;
BEGIN
    PERFORM keystile.announce_keys(ARRAY(
        SELECT secret_hash FROM keystile.keys WHERE owner_id = owner LIMIT 1001
    ));
    RETURN NULL;
END;
$$;

CREATE TRIGGER owner_policies_notify AFTER INSERT OR UPDATE OR DELETE ON keystile.owner_policies
FOR EACH ROW EXECUTE FUNCTION keystile.notify_owner_policy();

-- lease_units: grant up to `want` units (at least `need`, or none) across a key's rate limits and
-- credits, in one statement, for one period or (far from every limit) up to `periods` consecutive
-- ones. Returns the units granted per period, for how many milliseconds from now the first
-- period's may be spent, how many periods and how long each further one lasts, and for each counter (in the order given) what remains unleased and how long
-- until its oldest leased unit leaves the window; likewise for the credits.
--
-- The bound: a counter's units are charged to the last slot in which they may be spent. Any
-- interval of one window lies within k+1 consecutive slots (k = window / slot, rounded up), so a
-- lease granted in slot j must fit beside every unit charged to slot j-k or later. Every lease
-- of a counter takes the counter's advisory lock first (in name order across counters), so two
-- leases never both count the same room.
CREATE FUNCTION keystile.lease_units(
    counters text[],
    caps bigint[],
    window_ms bigint[],
    credit_key uuid,
    want bigint,
    need bigint,
    periods int
) RETURNS TABLE (
    granted bigint,
    valid_ms bigint,
    granted_periods int,
    period_ms bigint,
    remaining bigint[],
    reset_ms bigint[],
    credits_left bigint,
    credits_reset_ms bigint
)
LANGUAGE plpgsql AS $$
DECLARE
    now_ms bigint := floor(extract(epoch FROM clock_timestamp()) * 1000);
    n int := coalesce(cardinality(counters), 0);
    slot_ms bigint[] := '{}';
    span bigint[] := '{}';
    room bigint[] := '{}';
    oldest bigint[] := '{}';
    g bigint := want;
    until_ms bigint;
    period bigint;
    p int := 1;
    q int;
    i int;
    name text;
    s bigint;
    j bigint;
    m bigint;
    used_sum bigint;
    first_slot bigint;
    c_remaining bigint;
    c_amount bigint;
    c_refill text;
    c_refilled timestamptz;
    c_period timestamptz;
    c_next timestamptz;
    refilled boolean := false;
BEGIN
    FOR name IN SELECT DISTINCT c FROM unnest(counters) AS c ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(hashtextextended(name, 7));
    END LOOP;

    FOR i IN 1..n LOOP
        s := greatest(window_ms[i] / 200, 5);
        slot_ms[i] := s;
        span[i] := (window_ms[i] + s - 1) / s;
        j := now_ms / s;
        SELECT coalesce(sum(u.used), 0), min(u.slot) FILTER (WHERE u.used > 0)
          INTO used_sum, first_slot
          FROM keystile.usage_slots AS u
         WHERE u.counter = counters[i] AND u.slot >= j - span[i];
        room[i] := caps[i] - used_sum;
        oldest[i] := first_slot;
        -- Each lease takes at most a quarter of what is left: batches shrink near the limit, so
        -- units stranded in one process never starve the others.
        g := CASE WHEN room[i] < need THEN 0 ELSE least(g, greatest(need, room[i] / 4)) END;
    END LOOP;

    IF credit_key IS NOT NULL THEN
        SELECT k.remaining, k.refill_amount, k.refill, k.refilled_at
          INTO c_remaining, c_amount, c_refill, c_refilled
          FROM keystile.key_credits AS k WHERE k.key_id = credit_key FOR UPDATE;
        IF NOT FOUND THEN
            c_remaining := 0;
        ELSIF c_refill IS NOT NULL THEN
            c_period := date_trunc(CASE c_refill WHEN 'daily' THEN 'day' ELSE 'month' END, clock_timestamp(), 'UTC');
            c_next := ((c_period AT TIME ZONE 'UTC')
                       + CASE c_refill WHEN 'daily' THEN interval '1 day' ELSE interval '1 month' END) AT TIME ZONE 'UTC';
            IF c_refilled < c_period THEN
                c_remaining := c_amount;
                c_refilled := c_period;
                refilled := true;
            END IF;
        END IF;
        g := CASE WHEN c_remaining < need THEN 0 ELSE least(g, greatest(need, c_remaining / 4)) END;
    END IF;

    -- A key far from its limits (half of every one still free after the whole grant) and
    -- without credits may take a schedule: `periods` consecutive periods, each with g units of
    -- its own, in one statement. Each period's units are charged to that period's last slot,
    -- exactly as separate leases would be.
    IF periods > 1 AND credit_key IS NULL AND n > 0 AND g > 0 THEN
        p := periods;
        FOR i IN 1..n LOOP
            IF room[i] - g * periods < caps[i] / 2 THEN
                p := 1;
            END IF;
        END LOOP;
    END IF;

    IF g > 0 THEN
        FOR i IN 1..n LOOP
            s := slot_ms[i];
            j := now_ms / s;
            -- A period lasts about a twentieth of the window (ten slots), whatever the room left:
            -- its units are charged to its last slot and come back only a window after that, so
            -- a longer one would delay every caller's Retry-After; and callers size their next
            -- lease from this one's lifetime.
            m := span[i] / 20;
            until_ms := least(until_ms, (j + m + 1) * s);
            period := least(period, (m + 1) * s);
        END LOOP;
        until_ms := coalesce(until_ms, now_ms + 1000);
        period := coalesce(period, 1000);
        FOR i IN 1..n LOOP
            FOR q IN 0..p - 1 LOOP
                j := (until_ms + q * period - 1) / slot_ms[i];
                INSERT INTO keystile.usage_slots AS u (counter, slot, used) VALUES (counters[i], j, g)
                ON CONFLICT (counter, slot) DO UPDATE SET used = u.used + EXCLUDED.used;
            END LOOP;
            room[i] := room[i] - g * p;
            oldest[i] := least(oldest[i], (until_ms - 1) / slot_ms[i]);
        END LOOP;
        IF credit_key IS NOT NULL THEN
            c_remaining := c_remaining - g;
        END IF;
    END IF;
    IF credit_key IS NOT NULL AND (g > 0 OR refilled) THEN
        UPDATE keystile.key_credits SET remaining = c_remaining, refilled_at = c_refilled WHERE key_id = credit_key;
    END IF;

    FOR i IN 1..n LOOP
        j := now_ms / slot_ms[i];
        DELETE FROM keystile.usage_slots WHERE counter = counters[i] AND slot < j - span[i];
    END LOOP;

    RETURN QUERY SELECT
        g,
        CASE WHEN g > 0 THEN until_ms - now_ms ELSE 0 END,
        CASE WHEN g > 0 THEN p ELSE 0 END,
        CASE WHEN g > 0 THEN period ELSE 0 END,
        room,
        ARRAY(SELECT CASE WHEN oldest[x] IS NULL THEN 0::bigint
                          ELSE greatest((oldest[x] + span[x] + 1) * slot_ms[x] - now_ms, 0) END
                FROM generate_series(1, n) AS x),
        c_remaining,
        CASE WHEN c_next IS NULL THEN NULL
             ELSE ceil(extract(epoch FROM c_next - clock_timestamp()) * 1000)::bigint END;
END;
$$;

-- Keys made before this migration kept rate_limit_per_minute unenforced: it becomes their limit.
UPDATE keystile.keys
   SET limits = jsonb_build_array(jsonb_build_object(
           'name', 'per_minute', 'limit', rate_limit_per_minute, 'window_ms', 60000, 'burst', 0))
 WHERE rate_limit_per_minute > 0;
