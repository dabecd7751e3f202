"""New qcow2 images byte for byte as ``qemu-img create`` writes them (issue 12).

qemu-img create runs the same code as blockdev-create (qcow2_co_create), so
every layout qmpd plans (:mod:`qmpd.block.qcow2.create`) is compared with
the file qemu-img writes from the same options: multi-refblock images,
every preallocation mode, backing files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qmpd.block.qcow2.create import check_options, plan
from tests.support.tools import qemu_img

pytestmark = pytest.mark.qemu

MiB = 1 << 20
GiB = 1 << 30

CASES: list[dict[str, Any]] = [
    *({"size": size, "cluster-size": cs, "refcount-bits": bits}
      for size in (0, 512, MiB, GiB, 3 * GiB, (1 << 40) + 512)
      for cs in (512, 4096, 65536, 2 * MiB)
      for bits in (1, 16, 64)
      if not (cs == 512 and size > 3 * GiB)),
    {"size": GiB, "version": "v2"},
    {"size": GiB, "lazy-refcounts": True},
    {"size": GiB, "backing-file": "base.img", "backing-fmt": "raw"},
    {"size": GiB, "backing-file": "/abs/base.qcow2", "backing-fmt": "qcow2", "version": "v2"},
    *({"size": size, "cluster-size": cs, "refcount-bits": bits, "preallocation": mode}
      for mode in ("metadata", "falloc", "full")
      for size, cs, bits in ((5 * MiB + 512, 512, 16), (3 * MiB, 1024, 2),
                             (48 * MiB, 4096, 16), (130 * MiB + 4096, 65536, 16),
                             (9 * MiB, 2048, 64))),
    {"size": 3 * GiB, "preallocation": "metadata"},
]


def qemu_img_options(args: dict[str, Any]) -> list[str]:
    opts = [f"cluster_size={args.get('cluster-size', 65536)}",
            f"refcount_bits={args.get('refcount-bits', 16)}",
            f"compat={'0.10' if args.get('version') == 'v2' else '1.1'}",
            f"lazy_refcounts={'on' if args.get('lazy-refcounts') else 'off'}",
            f"preallocation={args.get('preallocation', 'off')}"]
    out = ["-o", ",".join(opts)]
    if "backing-file" in args:
        out += ["-u", "-b", args["backing-file"], "-F", args["backing-fmt"]]
    return out


@pytest.mark.parametrize("args", CASES, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
def test_layout_as_qemu_img(tmp_path: Path, args: dict[str, Any]) -> None:
    ref = tmp_path / "qemu.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", *qemu_img_options(args), ref, str(args["size"]))
    layout = plan(check_options(args))
    ours = tmp_path / "ours.qcow2"
    with open(ours, "wb") as f:  # sparse, as the images may be large
        for offset, data in layout.writes:
            f.seek(offset)
            f.write(data)
        f.truncate(max(layout.file_size, f.seek(0, 2)))
    assert ours.stat().st_size == ref.stat().st_size
    with open(ours, "rb") as a, open(ref, "rb") as b:
        pos = 0
        while True:
            x, y = a.read(MiB), b.read(MiB)
            assert x == y, f"difference in the MiB at {pos:#x}"
            if not x:
                break
            pos += len(x)
