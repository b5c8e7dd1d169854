-- The Go service's api_keys(id bigserial, org_id, name, hashed_key text: hex SHA-256 of the
-- rdev_sk_... key, project_ids text[], created_at, expires_at, revoked_at, last_used): projects
-- become resources, so a key for project 42 verifies with resource "42" only.
SELECT json_build_object(
    'secret_hash', hashed_key,
    'owner_id', org_id,
    'name', name,
    'prefix', 'rdev_sk',
    'secret_hint', 'rdev_sk_' || id,
    'scopes', json_build_array('api:read', 'api:write'),
    'resources', project_ids,
    'create_time', created_at,
    'expire_time', expires_at,
    'revoke_time', revoked_at,
    'revoke_reason', CASE WHEN revoked_at IS NOT NULL THEN 'revoked before the move to keystile' END,
    'last_used_time', last_used,
    'metadata', json_build_object('migrated_from', 'go api_keys', 'legacy_id', id)
)
FROM api_keys
ORDER BY id;
