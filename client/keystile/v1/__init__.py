"""Generated protobuf and gRPC code for keystile.v1 (regenerate with `make proto`; do not edit)."""

from __future__ import annotations
