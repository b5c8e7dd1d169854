#!/bin/sh
# Export the old table with mesh_api_key.sql and import it: every key keeps working with its secret.
#   OLD_DATABASE_URL=postgresql://... KEYSTILE_TARGET=host:50051 KEYSTILE_API_KEY=<admin> sh mesh_api_key.sh
set -eu
psql "$OLD_DATABASE_URL" --no-psqlrc --quiet -At -v ON_ERROR_STOP=1 -f "$(dirname "$0")/mesh_api_key.sql" > mesh_api_key.jsonl
keystile import mesh_api_key.jsonl
