"""Numbered SQL migrations, applied in order by ``keystile_server.store.migrate``."""
