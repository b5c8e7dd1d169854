"""Regenerate the committed Python code for proto/ (used by `make proto` and the staleness test).

The generated modules live at the path of their proto package (client/keystile/v1/) so that
`import keystile.v1.keys_pb2` works from the installed distribution. Generation is deterministic,
which is what lets a test regenerate into a temporary folder and compare byte for byte.
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_ROOT = ROOT / "client"
DESCRIPTORS = Path("keystile/v1/descriptors.binpb")


def proto_files() -> list[Path]:
    """Every .proto under proto/, relative to proto/, in a stable order."""
    return sorted(p.relative_to(PROTO_ROOT) for p in PROTO_ROOT.rglob("*.proto"))


def generate(out_root: Path = OUT_ROOT) -> list[Path]:
    """Run protoc with the Python, gRPC and mypy stub plugins; return the files written."""
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        # The descriptors with their comments, for reflection (grpcurl describe shows them).
        f"--descriptor_set_out={out_root / DESCRIPTORS}",
        "--include_source_info",
        *(str(p) for p in proto_files()),
    ]
    # protoc finds the mypy plugins on PATH; they sit beside this interpreter in the venv.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written: list[Path] = []
    for proto in proto_files():
        stem = proto.with_suffix("")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
            written.append(out_root / f"{stem}{suffix}")
    written.append(out_root / DESCRIPTORS)
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_ROOT
    for path in generate(out):
        print(path.relative_to(out))
