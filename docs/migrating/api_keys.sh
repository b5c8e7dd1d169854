#!/bin/sh
# Export the old table with api_keys.sql and import it: every key keeps working with its secret.
#   OLD_DATABASE_URL=postgresql://... KEYSTILE_TARGET=host:50051 KEYSTILE_API_KEY=<admin> sh api_keys.sh
set -eu
psql "$OLD_DATABASE_URL" --no-psqlrc --quiet -At -v ON_ERROR_STOP=1 -f "$(dirname "$0")/api_keys.sql" > api_keys.jsonl
keystile import api_keys.jsonl
