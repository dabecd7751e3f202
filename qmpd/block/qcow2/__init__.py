"""The qcow2 format driver (QEMU 7.2 compatible on-disk format).

Modules, lowest first (each imports only those before it): ``format``
(header, extensions, entry math), ``cache`` (bounded write-back metadata
caches), ``refcount`` (refcount blocks, reftable, allocation), ``state`` (the
mutable state of an open image), ``mapping`` (L2 lookup, reads, block
status), ``allocation`` (writes, COW, zeroing, discard), ``repair`` (refcount
rebuild for dirty images), ``image`` (open, header, flush, resize; composes
the others), ``driver`` (the BlockDriver), ``standalone`` (opening images
without QMP, for tests and tools).
"""

from qmpd.block.qcow2.driver import Qcow2Driver

__all__ = ["Qcow2Driver"]
