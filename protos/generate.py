"""`python protos/generate.py [OUT_DIR]`: generated/ (or OUT_DIR) from protos/; `make proto`."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from google.rpc import status_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
# Only our own API; google/type/money.proto comes from googleapis-common-protos.
SOURCES = sorted((PROTOS / "acme").rglob("*.proto"))
# A FileDescriptorSet of the API, every file it imports and the google.rpc error types,
# with their comments, which reflection serves (docs/decisions/0018): the *_pb2
# modules' descriptors have no comments.
DESCRIPTOR_SET = Path("acme/orders/v1/order_service.binpb")
# The status and details of every error (server/api/errors.py), from googleapis-common-protos,
# which ships their .proto files next to the modules.
ERROR_TYPES = ["google/rpc/status.proto", "google/rpc/error_details.proto"]
GOOGLEAPIS = Path(status_pb2.__file__).resolve().parents[2]


def generate(out_dir: Path) -> None:
    """Writes the Python modules, gRPC stubs and .pyi stubs into out_dir."""
    # protoc finds the mypy-protobuf plugins on PATH: the venv's bin directory.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    with tempfile.TemporaryDirectory() as tmp:
        grpc_include = Path(protoc.__file__).parent / "_proto"
        args = [
            "protoc",
            f"-I{PROTOS}",
            f"-I{grpc_include}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *(str(s) for s in SOURCES),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        descriptor_args = [
            "protoc",
            f"-I{PROTOS}",  # first: protos/google/type/money.proto is the one the API uses
            f"-I{grpc_include}",
            f"-I{GOOGLEAPIS}",
            "--include_imports",
            "--include_source_info",
            f"--descriptor_set_out={Path(tmp) / DESCRIPTOR_SET}",
            *(str(s.relative_to(PROTOS)) for s in SOURCES),
            *ERROR_TYPES,
        ]
        if protoc.main(descriptor_args) != 0:
            raise SystemExit("protoc failed (descriptor set)")
        # Each directory a regular package, so importers need no sys.path tricks
        # and mypy sees one package root.
        for directory in [Path(tmp), *Path(tmp).rglob("*")]:
            if directory.is_dir() and directory != Path(tmp):
                (directory / "__init__.py").touch()
        (Path(tmp) / "acme" / "py.typed").touch()
        target = out_dir / "acme"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(Path(tmp) / "acme", target)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "generated")
