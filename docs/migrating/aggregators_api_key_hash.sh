#!/bin/sh
# Export the old table with aggregators_api_key_hash.sql and import it: every key keeps working with its secret.
#   OLD_DATABASE_URL=postgresql://... KEYSTILE_TARGET=host:50051 KEYSTILE_API_KEY=<admin> sh aggregators_api_key_hash.sh
set -eu
psql "$OLD_DATABASE_URL" --no-psqlrc --quiet -At -v ON_ERROR_STOP=1 -f "$(dirname "$0")/aggregators_api_key_hash.sql" > aggregators_api_key_hash.jsonl
keystile import aggregators_api_key_hash.jsonl
