-- api_keys(key_hash text: hex SHA-256, user_id, name, key_prefix, scopes text[], rate_limit_rpm,
-- is_active, expires_at, created_at, last_used_at) as keystile import's JSON lines.
-- An inactive key comes in disabled (reversible), not revoked.
SELECT json_build_object(
    'secret_hash', key_hash,
    'owner_id', user_id,
    'name', name,
    'secret_hint', key_prefix,
    'prefix', 'sk_live',
    'scopes', scopes,
    'rate_limit_per_minute', coalesce(rate_limit_rpm, 0),
    'disabled', NOT is_active,
    'expire_time', expires_at,
    'create_time', created_at,
    'last_used_time', last_used_at,
    'metadata', json_build_object('migrated_from', 'api_keys', 'legacy_id', id)
)
FROM api_keys
ORDER BY id;
