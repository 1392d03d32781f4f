"""Builds the convd package: its gRPC stubs are generated from the repository's proto/ files at
build time (protoc and grpc_python_plugin, Debian's protobuf-compiler and
protobuf-compiler-grpc), never edited by hand or committed."""
import os
import shutil
import subprocess
import tempfile

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))
FILES = ["convd/v1/convd.proto", "grpc/health/v1/health.proto"]


def generate():
    protoc, plugin = shutil.which("protoc"), shutil.which("grpc_python_plugin")
    if not (protoc and plugin and os.path.isdir(PROTO)):
        raise SystemExit("building convd needs protoc, grpc_python_plugin (apt install protobuf-compiler "
                         f"protobuf-compiler-grpc) and the repository's proto/ directory ({PROTO})")
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([protoc, f"-I{PROTO}", f"--python_out={out}", f"--grpc_out={out}",
                        f"--plugin=protoc-gen-grpc={plugin}", *FILES], check=True)
        v1 = os.path.join(HERE, "convd", "v1")
        health = os.path.join(HERE, "convd", "_health")
        for d in (v1, health):
            os.makedirs(d, exist_ok=True)
            open(os.path.join(d, "__init__.py"), "w").close()
        for name in ("convd_pb2.py", "convd_pb2_grpc.py"):
            shutil.copy(os.path.join(out, "convd", "v1", name), v1)
        # grpc/health/v1 would be shadowed by grpcio's own grpc package: a package of ours.
        for name in ("health_pb2.py", "health_pb2_grpc.py"):
            with open(os.path.join(out, "grpc", "health", "v1", name)) as f:
                text = f.read().replace("from grpc.health.v1 import", "from convd._health import")
            with open(os.path.join(health, name), "w") as f:
                f.write(text)


# Before setup(): the metadata step already lists the generated packages.
generate()
setup()
