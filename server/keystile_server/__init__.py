"""keystile server: the gRPC service, its domain rules, the PostgreSQL store and the CLI.

Layers, from the wire inwards: ``handlers`` translate protobuf to domain calls, ``service`` decides,
``store`` does SQL. ``rpc_errors`` is the one place domain errors become gRPC statuses.
"""

from __future__ import annotations
