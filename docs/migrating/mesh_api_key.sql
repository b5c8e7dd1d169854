-- mesh.api_key(id uuid, tenant, label, secret_sha256 bytea, capabilities jsonb, topic_scopes jsonb,
-- revoked_at, created_at): capabilities become scopes, topic patterns become resources.
SELECT json_build_object(
    'secret_hash', encode(secret_sha256, 'hex'),
    'owner_id', tenant,
    'name', label,
    'prefix', 'msh',
    'secret_hint', 'msh_' || left(id::text, 8),
    'scopes', capabilities,
    'resources', topic_scopes,
    'revoke_time', revoked_at,
    'revoke_reason', CASE WHEN revoked_at IS NOT NULL THEN 'revoked before the move to keystile' END,
    'create_time', created_at,
    'metadata', json_build_object('migrated_from', 'mesh.api_key', 'legacy_id', id)
)
FROM mesh.api_key
ORDER BY created_at;
