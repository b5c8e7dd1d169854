#!/bin/sh
# Export the old table with go_api_keys.sql and import it: every key keeps working with its secret.
#   OLD_DATABASE_URL=postgresql://... KEYSTILE_TARGET=host:50051 KEYSTILE_API_KEY=<admin> sh go_api_keys.sh
set -eu
psql "$OLD_DATABASE_URL" --no-psqlrc --quiet -At -v ON_ERROR_STOP=1 -f "$(dirname "$0")/go_api_keys.sql" > go_api_keys.jsonl
keystile import go_api_keys.jsonl
