"""Ceph's Python bindings (``rados``, ``rbd``), an optional dependency.

They are not on PyPI: the distribution builds them (Debian's ``python3-rados``
and ``python3-rbd``) for its own Python.  :func:`bindings` imports them the
ordinary way when they are on ``sys.path`` (a venv made with
``--system-site-packages``, say); otherwise it looks for the distribution's
two extension modules in its package directories (``dist-packages``, or the
directory ``QMPD_CEPH_PYTHON`` names) and loads just those two, when they were
built for this interpreter (the file name ends with its ABI suffix,
``.cpython-311-x86_64-linux-gnu.so``).  Nothing else of the distribution's
Python directory is put on the path.
"""

from __future__ import annotations

import errno
import glob
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType

from qmpd.errors import BlockDriverError

#: Where distributions install the modules of their own Python.
_DIST_DIRS = ("/usr/lib/python3/dist-packages", "/usr/lib64/python3*/site-packages",
              "/usr/lib/python3*/site-packages", "/usr/local/lib/python3*/dist-packages")
#: Names the packages that provide the bindings, for the error users see.
PACKAGES = "Ceph's Python bindings 'rados' and 'rbd' (Debian: python3-rados, python3-rbd)"

_loaded: tuple[ModuleType, ModuleType] | None = None
_failure: str | None = None


def _candidate_dirs() -> list[str]:
    dirs: list[str] = []
    override = os.environ.get("QMPD_CEPH_PYTHON")
    if override:
        dirs.extend(override.split(os.pathsep))
    for pattern in _DIST_DIRS:
        dirs.extend(sorted(glob.glob(pattern)))
    return dirs


def _load_extension(name: str, dirs: list[str]) -> ModuleType | None:
    """Load ``name`` from the first directory holding it for this interpreter's ABI."""
    for directory in dirs:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(directory, name + suffix)
            if not os.path.isfile(path):
                continue
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                continue
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # rbd imports rados by name
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
            return module
    return None


def _find() -> tuple[ModuleType, ModuleType]:
    try:
        return importlib.import_module("rados"), importlib.import_module("rbd")
    except ImportError as exc:
        first = str(exc)
    dirs = _candidate_dirs()
    try:
        rados = sys.modules.get("rados") or _load_extension("rados", dirs)
        rbd = _load_extension("rbd", dirs) if rados is not None else None
    except ImportError as exc:  # built for another Python, or a missing librbd
        raise RuntimeError(f"{exc}") from None
    if rados is None or rbd is None:
        raise RuntimeError(first)
    return rados, rbd


def bindings() -> tuple[ModuleType, ModuleType]:
    """``(rados, rbd)``; raises a BlockDriverError naming the packages without them."""
    global _loaded, _failure
    if _loaded is not None:
        return _loaded
    if _failure is None:
        try:
            _loaded = _find()
            return _loaded
        except RuntimeError as exc:
            _failure = str(exc)
    raise BlockDriverError(
        f"The rbd driver needs {PACKAGES}, which this Python cannot import ({_failure})",
        errno.ENOTSUP)


def available() -> bool:
    """Whether :func:`bindings` succeeds."""
    try:
        bindings()
    except BlockDriverError:
        return False
    return True
