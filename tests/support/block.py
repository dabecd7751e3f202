"""Block-node options and images for in-process tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qmpd.block.qcow2.create import create_image

MiB = 1 << 20


def qcow2(tmp_path: Path, name: str, size: int = 4 * MiB) -> dict[str, Any]:
    """blockdev-add options of a new qcow2 image ``name`` over a file node ``name-file``."""
    path = str(tmp_path / f"{name}.qcow2")
    create_image(path, size)
    return {"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "node-name": f"{name}-file", "filename": path}}
