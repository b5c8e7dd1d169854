#!/bin/sh
# Convex userApiKeys documents (from `npx convex export --path export.zip`, then unzip): keyHash is
# the hex SHA-256 of the wm_... key; times are epoch milliseconds; revokedAt marks a revoked key.
#   KEYSTILE_TARGET=host:50051 KEYSTILE_API_KEY=<admin> sh convex_user_api_keys.sh export/userApiKeys/documents.jsonl
set -eu
keystile import "$1" \
    --map secret_hash=keyHash \
    --map owner_id=userId \
    --map secret_hint=keyPrefix \
    --map create_time=_creationTime:ms \
    --map last_used_time=lastUsedAt:ms \
    --map revoke_time=revokedAt:ms \
    --map expire_time=expiresAt:ms \
    --set prefix=wm
