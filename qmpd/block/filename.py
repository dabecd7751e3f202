"""Node filenames as QEMU's ``bdrv_refresh_filename`` computes them.

A node shows its protocol child's file name when opening that file with the
node's driver would rebuild the same graph: no strong options (``offset``
and ``size`` of raw, say), no backing node other than the one the image
header names, and a protocol node directly below.  Otherwise its name is
``json:`` followed by the options that would rebuild it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qmpd.qmp.encode import encode

if TYPE_CHECKING:
    from qmpd.block.graph import BlockNode


#: Per node, what :func:`_refresh` returned, for one query of many nodes
#: (the graph does not change during it).  The option dicts are shared, so
#: nobody may mutate them.
FilenameMemo = dict["BlockNode", tuple[str, dict[str, Any]]]


def refresh_filename(node: BlockNode, memo: FilenameMemo | None = None) -> str:
    """The ``file``/``filename`` QEMU reports for ``node``."""
    exact, options = _refresh(node, {} if memo is None else memo)
    return exact or "json:" + encode(options)


def backing_overridden(node: BlockNode) -> bool:
    """Whether ``node``'s backing is not what its header names (bdrv_backing_overridden)."""
    return _backing_overridden(node, {})


def _backing_overridden(node: BlockNode, memo: FilenameMemo) -> bool:
    # A backing node opened from the header is what the header names.
    if "backing" not in node.options:
        return False
    auto = node.driver.auto_backing_file()
    if node.backing is None:
        return auto != ""
    return auto != refresh_filename(node.backing, memo)


def _refresh(node: BlockNode, memo: FilenameMemo) -> tuple[str, dict[str, Any]]:
    done = memo.get(node)
    if done is not None:
        return done
    driver = node.driver
    overridden = "backing" in node.options and _backing_overridden(node, memo)
    options: dict[str, Any] = {}
    # QEMU lists children newest first; the order only matters for keys
    # that share a QDict bucket.
    for name, edge in reversed(node.children.items()):
        if name == "backing" and not overridden:
            continue
        options[name] = _refresh(edge.child, memo)[1]
    if overridden and node.backing is None:
        options["backing"] = None
    options["driver"] = driver.format_name
    options.update(driver.filename_options())
    strong: dict[str, Any] = {}
    if driver.strong_runtime_opts:
        strong = {k: node.options[k] for k in driver.strong_runtime_opts if k in node.options}
        options.update(strong)
    exact = ""
    if not (overridden or strong):
        if driver.is_protocol:
            exact = driver.exact_filename()
        else:
            primary = node.file
            if primary is not None and primary.driver.is_protocol:
                exact = _refresh(primary, memo)[0]
    memo[node] = (exact, options)
    return exact, options


def path_combine(base: str, name: str) -> str:
    """QEMU's ``path_combine``: ``name`` relative to the directory of ``base``."""
    if not name or name.startswith("/") or "://" in name:
        return name
    slash = base.rfind("/")
    return name if slash < 0 else base[: slash + 1] + name
