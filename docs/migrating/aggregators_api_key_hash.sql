-- aggregators.api_key_hash(aggregator_id, key_hash text: base64 SHA-256, created, disabled): one key
-- per aggregator, owned by it, with the single scope aggregates:write.
SELECT json_build_object(
    'secret_hash', key_hash,
    'owner_id', aggregator_id,
    'name', 'aggregator ' || aggregator_id,
    'prefix', 'agg',
    'scopes', json_build_array('aggregates:write'),
    'disabled', disabled,
    'create_time', created,
    'metadata', json_build_object('migrated_from', 'aggregators.api_key_hash')
)
FROM aggregators.api_key_hash
ORDER BY aggregator_id;
