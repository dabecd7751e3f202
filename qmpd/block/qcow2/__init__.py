"""The qcow2 format driver (QEMU 7.2 compatible on-disk format).

Modules: ``format`` (header, extensions, entry math), ``cache`` (bounded
write-back metadata caches), ``refcount`` (refcount blocks, reftable,
allocation), ``cluster`` (the open image: translation, COW, I/O),
``repair`` (refcount rebuild for dirty images), ``driver`` (the BlockDriver),
``standalone`` (opening images without QMP, for tests and tools).
"""

from qmpd.block.qcow2.driver import Qcow2Driver

__all__ = ["Qcow2Driver"]
