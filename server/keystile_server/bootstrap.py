"""``keystile bootstrap``: the first admin key, minted straight into the database.

No server runs yet and no caller can authenticate, so this goes under the RPCs: migrate, open a
one-connection pool, and let the domain service mint the key (the same code and rules as
CreateKey, and the same audit event).
"""

from __future__ import annotations

import asyncio

from .embedded import EmbeddedPostgres
from .metrics import ServerMetrics
from .server import build_service
from .service import CreatedKey
from .settings import Settings
from .store import KeyStore, migrate
from .usage import UsageRecorder


async def bootstrap_admin(settings: Settings, *, owner_id: str, name: str, force: bool) -> CreatedKey:
    """Mint the first admin key directly in the database (migrating it first if needed)."""
    embedded = EmbeddedPostgres(settings.data_dir) if settings.database_url is None else None
    url = await asyncio.to_thread(embedded.start) if embedded else settings.database_url
    assert url is not None
    try:
        await migrate(url)
        pool = KeyStore.create_pool(url, min_size=1, max_size=1, timeout=settings.db_timeout)
        await pool.open(wait=True, timeout=settings.db_timeout)
        try:
            store = KeyStore(pool)
            service = await build_service(
                store,
                settings,
                UsageRecorder(store, flush_interval=60),
                static_admin_key=None,
                metrics=ServerMetrics(),
            )
            return await service.bootstrap_admin(owner_id, name, force=force)
        finally:
            await pool.close()
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
