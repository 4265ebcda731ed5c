"""Build hook: generate the gRPC/protobuf modules from proto/ at build time.

`proto/fedhl/v1/*.proto` (package fedhl.v1) compiles with `-I proto` into
`services/fedhl/v1/*_pb2.py`, so the generated imports (`from fedhl.v1 import ...`) resolve
unchanged: no post-processing. The output is git-ignored and always regenerated; it runs for
wheels and editable installs alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


def generate(root: Path) -> list[Path]:
    """Compile every .proto under proto/ into services/; returns the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    proto_root = root / "proto"
    out = root / "services"
    protos = sorted(proto_root.rglob("*.proto"))
    if not protos:
        return []
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {[str(p) for p in protos]}")
    generated: list[Path] = []
    for p in protos:
        pkg_dir = out / p.parent.relative_to(proto_root)
        init = pkg_dir / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated from proto/ by hatch_build.py; do not edit."""\n')
        generated += [init, *pkg_dir.glob(f"{p.stem}_pb2*.py*")]
    return generated


class CustomBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        root = Path(self.root)
        files = generate(root)
        # Generated files are git-ignored; artifacts puts them in the wheel anyway.
        build_data["artifacts"].extend(str(f.relative_to(root)) for f in files)


if __name__ == "__main__":  # regenerate in a checkout without reinstalling
    for f in generate(Path(__file__).resolve().parent):
        print(f)
