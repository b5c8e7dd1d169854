"""The SQL of ImportKeys: a batch of keys known by hash, in one transaction, each audited."""

from __future__ import annotations

from typing import Final

import psycopg
from psycopg.rows import TupleRow

from ..audit import key_entry
from ..model import ImportedKey, KeyRecord
from .audit_store import insert_audit
from .connections import GuardedStore
from .key_store import KEY_COLUMNS, key_record, new_key_params

Conn = psycopg.AsyncConnection[TupleRow]

# A hash already stored is skipped (the row reports a duplicate), never overwritten.
_IMPORT: Final = f"""
    INSERT INTO keystile.keys (id, owner_id, name, prefix, secret_hash, secret_hint, scopes, resources,
                               metadata, rate_limit_per_minute, create_time, expire_time, revoke_time,
                               revoke_reason, last_used_time, created_by, limits, disable_time)
    VALUES (%(id)s, %(owner_id)s, %(name)s, %(prefix)s, %(secret_hash)s, %(secret_hint)s, %(scopes)s,
            %(resources)s, %(metadata)s, %(rate_limit_per_minute)s, coalesce(%(create_time)s, now()),
            %(expire_time)s, %(revoke_time)s, %(revoke_reason)s, %(last_used_time)s, %(created_by)s,
            %(limits)s, CASE WHEN %(disabled)s THEN now() END)
    ON CONFLICT (secret_hash) DO NOTHING
    RETURNING {KEY_COLUMNS}
"""


class ImportStore(GuardedStore):
    """ImportKeys' writes, over ``KeyStore``'s guarded pool."""

    async def import_keys(self, keys: list[ImportedKey], *, actor: str) -> list[KeyRecord | None]:
        """Insert each key unless its hash is stored already (None for those), with its audit event."""

        async def query(conn: Conn) -> list[KeyRecord | None]:
            stored: list[KeyRecord | None] = []
            async with conn.transaction():
                for imported in keys:
                    new = imported.key
                    params = new_key_params(new) | {
                        "create_time": imported.create_time,
                        "revoke_time": imported.revoke_time,
                        "revoke_reason": imported.revoke_reason,
                        "last_used_time": imported.last_used_time,
                        "disabled": imported.disabled,
                    }
                    cur = await conn.execute(_IMPORT, params)
                    row = await cur.fetchone()
                    record = key_record(row) if row else None
                    if record is not None:
                        await insert_audit(conn, key_entry("key.import", actor, None, record))
                    stored.append(record)
            return stored

        return await self._run("import_keys", query, read=False)
