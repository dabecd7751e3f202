"""The qcow2 format driver: options, open/close, activation, queries.

The mutable image state lives in :class:`~qmpd.block.qcow2.image.Qcow2Image`;
this class keeps only the immutable configuration (the options) and swaps
the whole image object on :meth:`Qcow2Driver.invalidate_cache`, which is how
QEMU's ``qcow2_co_invalidate_cache`` behaves too (close, zero the state, open
again with the same options).
"""

from __future__ import annotations

import errno as errno_codes
import logging
from collections.abc import Awaitable
from dataclasses import replace
from typing import Any, NoReturn

from qmpd.block.blocking import CacheReload, OpenJob, WouldBlock
from qmpd.block.driver import BlockDriver, BlockDriverError, BlockStatus, NodeState
from qmpd.block.extent import HostSpan
from qmpd.block.filename import path_combine
from qmpd.block.qcow2.bitmaps import cannot_store, store_bitmaps, write_header_cluster
from qmpd.block.qcow2.fileio import ImageFile
from qmpd.block.qcow2.format import (
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    MIN_CLUSTER_BITS,
    QCOW_MAGIC,
    Header,
    Qcow2FormatError,
)
from qmpd.block.qcow2.image import LoadedMetadata, Qcow2Image, read_metadata_blocking
from qmpd.block.qcow2.overlap import overlap_checks
from qmpd.block.qcow2.state import DISCARD_OTHER, DISCARD_REQUEST, DISCARD_SNAPSHOT, CacheConfig

log = logging.getLogger(__name__)

#: QEMU's defaults on Linux (block/qcow2.h).
DEFAULT_L2_CACHE_MAX_SIZE = 32 * 1024 * 1024
MIN_L2_CACHE_SIZE = 2  # entries
MIN_REFCOUNT_CACHE_SIZE = 4  # clusters
DEFAULT_CACHE_CLEAN_INTERVAL = 600
INT_MAX = 2**31 - 1
UINT_MAX = 2**32 - 1

ENOMEDIUM = 123


class _OptionError(BlockDriverError):
    """An invalid option (EINVAL): reported as it is, never as an I/O failure."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc, errno_codes.EINVAL)


def _opt_int(options: dict[str, Any], key: str) -> int | None:
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        raise _OptionError(f"Parameter '{key}' expects a number")
    if isinstance(value, int):
        return value
    try:
        return int(str(value), 0)
    except ValueError:
        raise _OptionError(f"Parameter '{key}' expects a number") from None


def _opt_bool(options: dict[str, Any], key: str, default: bool = False) -> bool:
    value = options.get(key)
    if value is None:
        return default
    if isinstance(value, str):
        return value in ("on", "true", "yes")
    return bool(value)


def read_cache_sizes(
    options: dict[str, Any], virtual_size: int, cluster_size: int, l2_entry_bytes: int = 8
) -> tuple[int, int, int]:
    """QEMU 7.2's ``read_cache_sizes``: (L2 cache bytes, L2 entry size, refcount bytes).

    Raises a block error with QEMU's texts for invalid combinations.
    """
    min_refcount_cache = MIN_REFCOUNT_CACHE_SIZE * cluster_size
    max_l2_entries = -(-virtual_size // cluster_size)
    max_l2_cache = -(-(max_l2_entries * l2_entry_bytes) // cluster_size) * cluster_size

    combined = _opt_int(options, "cache-size")
    l2_set = _opt_int(options, "l2-cache-size")
    rc_set = _opt_int(options, "refcount-cache-size")
    entry_set = _opt_int(options, "l2-cache-entry-size")
    for key, value in (("cache-size", combined), ("l2-cache-size", l2_set),
                       ("refcount-cache-size", rc_set), ("l2-cache-entry-size", entry_set)):
        if value is not None and value < 0:
            raise _OptionError(
                f"Parameter '{key}' expects a non-negative number below 2^64")

    l2_max_setting = l2_set if l2_set is not None else DEFAULT_L2_CACHE_MAX_SIZE
    refcount_size = rc_set if rc_set is not None else 0
    entry_size = entry_set if entry_set is not None else cluster_size
    l2_size = min(max_l2_cache, l2_max_setting)

    if combined is not None:
        if l2_set is not None and rc_set is not None:
            raise _OptionError(
                "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"
            )
        if l2_set is not None and l2_max_setting > combined:
            raise _OptionError("l2-cache-size may not exceed cache-size")
        if refcount_size > combined:
            raise _OptionError("refcount-cache-size may not exceed cache-size")
        if l2_set is not None:
            refcount_size = combined - l2_size
        elif rc_set is not None:
            l2_size = combined - refcount_size
        elif combined >= max_l2_cache + min_refcount_cache:
            l2_size = max_l2_cache
            refcount_size = combined - l2_size
        else:
            refcount_size = min(combined, min_refcount_cache)
            l2_size = combined - refcount_size

    if l2_size < max_l2_cache and entry_set is None:
        entry_size = min(cluster_size, 4096)

    if (entry_size < (1 << MIN_CLUSTER_BITS) or entry_size > cluster_size
            or entry_size & (entry_size - 1)):
        raise _OptionError(
            "L2 cache entry size must be a power of two between "
            f"{1 << MIN_CLUSTER_BITS} and the cluster size ({cluster_size})"
        )
    return l2_size, entry_size, refcount_size


def cache_config(options: dict[str, Any], virtual_size: int, cluster_size: int) -> CacheConfig:
    """Cache sizes in entries, with QEMU's minimums and overflow errors."""
    l2_bytes, entry_size, refcount_bytes = read_cache_sizes(options, virtual_size, cluster_size)
    l2_entries = max(l2_bytes // entry_size, MIN_L2_CACHE_SIZE)
    if l2_entries > INT_MAX:
        raise _OptionError("L2 cache size too big")
    refcount_entries = max(refcount_bytes // cluster_size, MIN_REFCOUNT_CACHE_SIZE)
    if refcount_entries > INT_MAX:
        raise _OptionError("Refcount cache size too big")
    return CacheConfig(l2_entries, entry_size, refcount_entries)


class Qcow2Driver(BlockDriver):
    """qcow2 v2/v3 (QEMU 7.2 on-disk format), read and write."""

    format_name = "qcow2"
    supports_backing = True

    @classmethod
    def probe(cls, head: bytes) -> bool:
        return len(head) >= 4 and int.from_bytes(head[:4], "big") == QCOW_MAGIC

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self._options: dict[str, Any] = {}
        self._image: Qcow2Image | None = None
        self._broken: str | None = None
        #: Whether the open image has preallocated metadata (checked once).
        self._prealloc: tuple[Qcow2Image, bool] | None = None
        self._size = 0
        self._header: Header | None = None
        #: Activations (cache reloads) begun: a refresh of an inactive node
        #: that one overtook must not install what it read.
        self._activations = 0

    # --- lifecycle --------------------------------------------------------------

    def _validate_static_options(self, options: dict[str, Any]) -> None:
        interval = _opt_int(options, "cache-clean-interval")
        if interval is not None and (interval < 0 or interval > UINT_MAX):
            raise _OptionError("Cache clean interval too big")
        try:
            overlap_checks(options.get("overlap-check"))
        except Qcow2FormatError as exc:
            raise _OptionError(str(exc)) from None

    def _config_for(self, header: Header) -> CacheConfig:
        if _opt_bool(self._options, "lazy-refcounts") and header.version < 3:
            raise _OptionError(
                "Lazy refcounts require a qcow2 image with at least qemu 1.1 "
                "compatibility level"
            )
        return cache_config(self._options, header.size, header.cluster_size)

    async def open(self, options: dict[str, Any]) -> None:
        self._options = dict(options)
        self._validate_static_options(self._options)
        await self._opening(self._load())

    async def _opening(self, load: Awaitable[None]) -> None:
        """Await ``load`` with open's error texts."""
        try:
            await load
        except Qcow2FormatError as exc:
            raise BlockDriverError(str(exc), errno_codes.EINVAL) from None
        except _OptionError:
            raise
        except BlockDriverError as exc:
            raise BlockDriverError(f"Could not open qcow2 image: {exc}", exc.errno) from None
        except OSError as exc:
            raise BlockDriverError(f"Could not read qcow2 header: {exc.strerror}",
                                   exc.errno or errno_codes.EIO) from None

    def begin_open_over(self, options: dict[str, Any], below: OpenJob) -> OpenJob:
        """Open the file and read the header, L1 and refcount tables in one job.

        The errors keep open's order: the file's, the static options', then
        the metadata's (the reads may have happened; they change nothing).
        """
        self._options = dict(options)
        config_for = self._config_for
        writable = not self.node.read_only

        def run() -> tuple[Any, tuple[LoadedMetadata, int, int] | Exception | None]:
            opened = below.run()
            try:
                read = below.reader(opened)
                if read is None:
                    return opened, None
                return opened, read_metadata_blocking(read, config_for, writable)
            except Exception as exc:  # raised on the loop, once the file is installed
                return opened, exc

        async def finish(
            result: tuple[Any, tuple[LoadedMetadata, int, int] | Exception | None],
        ) -> None:
            opened, outcome = result
            await below.finish(opened)
            self._validate_static_options(self._options)
            if outcome is None or isinstance(outcome, WouldBlock):
                await self._opening(self._load())
            else:
                await self._opening(self._load_from(outcome))

        return OpenJob(run, finish, waits=below.waits)

    async def _load(self) -> None:
        self._install(await self._read_image(not self.node.read_only, self.node.active))

    async def _read_image(self, writable: bool, active: bool) -> Qcow2Image:
        node = self.node
        child = node.file
        read = child.driver.blocking_reader() if child is not None else None
        if child is None or read is None:
            return await Qcow2Image.load(node, self._config_for, writable, active)
        # Header, L1 and refcount tables in one I/O-thread job, not one hop
        # each (or right here when the file is in memory).
        if child.driver.reads_inline():
            outcome = read_metadata_blocking(read, self._config_for, writable)
        else:
            outcome = await node.graph.run_io(
                read_metadata_blocking, read, self._config_for, writable)
        return await self._image_from(outcome, writable, active)

    async def _load_from(self, outcome: tuple[LoadedMetadata, int, int] | Exception) -> None:
        """Install what :func:`read_metadata_blocking` returned (or raise what it raised)."""
        self._install(await self._image_from(outcome, not self.node.read_only, self.node.active))

    async def _image_from(self, outcome: tuple[LoadedMetadata, int, int] | Exception,
                          writable: bool, active: bool) -> Qcow2Image:
        if isinstance(outcome, Exception):
            raise outcome
        node = self.node
        child = node.file
        assert child is not None
        loaded, reads, nbytes = outcome
        child.stats.rd_operations += reads
        child.stats.rd_bytes += nbytes
        return await Qcow2Image.from_metadata(node, ImageFile(child), loaded, writable, active)

    def _install(self, image: Qcow2Image) -> None:
        default_request = bool(self.node.discard_unmap)
        opts = self._options
        image.pass_discard[DISCARD_REQUEST] = _opt_bool(opts, "pass-discard-request",
                                                        default_request)
        image.pass_discard[DISCARD_SNAPSHOT] = _opt_bool(opts, "pass-discard-snapshot", True)
        image.pass_discard[DISCARD_OTHER] = _opt_bool(opts, "pass-discard-other")
        image.overlap.checks = overlap_checks(opts.get("overlap-check"))
        self._image = image
        self._header = image.header
        self._size = image.size

    async def close(self) -> None:
        image = self._image
        if image is None:
            return
        try:
            if image.writable and image.broken is None:
                await self._store_or_report(image)
                await image.flush()
        finally:
            self._image = None

    # --- persistent dirty bitmaps ---------------------------------------------------------

    def _has_bitmaps(self, image: Qcow2Image) -> bool:
        """Whether storing would write anything: a directory on disk (its in-use
        marks to clear) or persistent bitmaps on the node."""
        if image.bitmap_entries:
            return True
        for bitmap in self.node.dirty_bitmaps.values():  # no generator: a hot path
            if bitmap.persistent:
                return True
        return False

    async def _store_bitmaps(self, image: Qcow2Image) -> None:
        if not self._has_bitmaps(image):
            return
        await image.quiesce()
        async with image.lock:
            await store_bitmaps(image, list(self.node.dirty_bitmaps.values()),
                                image.bitmap_entries)

    async def _store_or_report(self, image: Qcow2Image) -> BlockDriverError | None:
        """Store; a failure is logged with QEMU's text and returned, so that
        the flush still happens (qcow2_inactivate)."""
        try:
            await self._store_bitmaps(image)
        except (BlockDriverError, Qcow2FormatError, OSError) as exc:
            log.error("Lost persistent bitmaps during inactivation of node '%s': %s",
                      self.node.node_name, exc)
            return BlockDriverError(str(exc), errno_codes.EINVAL)
        return None

    def can_store_new_bitmap(self, name: str, granularity: int) -> None:
        image = self._img()
        error = cannot_store(image, image.bitmap_entries, name, granularity)
        if error is not None:
            raise BlockDriverError(
                f"Can't make bitmap '{name}' persistent in '{self.node.node_name}': {error}",
                error.errno)

    async def store_persistent_bitmaps(self) -> None:
        image = self._image
        if image is not None and image.writable and image.broken is None:
            await self._store_bitmaps(image)

    async def remove_persistent_bitmap(self, name: str) -> None:
        image = self._image
        if image is None or not any(e.name == name for e in image.bitmap_entries):
            return
        image.check_writable()
        await image.quiesce()
        async with image.lock:
            await store_bitmaps(image, [], image.bitmap_entries, removed=name)

    # --- helpers ---------------------------------------------------------------------

    def _img(self) -> Qcow2Image:
        image = self._image
        if image is None:
            raise BlockDriverError(self._broken or "No medium found", ENOMEDIUM)
        return image

    def _img_for_write(self) -> Qcow2Image:
        image = self._img()
        if self.node.state is not NodeState.ACTIVE:
            raise BlockDriverError("Block node is inactive", 1)
        return image

    @property
    def image(self) -> Qcow2Image | None:
        """The current image state (None while unusable); for tests and tools."""
        return self._image

    # --- I/O ---------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        image = self._image
        if image is None:
            raise BlockDriverError(self._broken or "No medium found", ENOMEDIUM)
        return await image.read(offset, length)

    async def read_into(self, offset: int, buf: memoryview) -> None:
        image = self._image
        if image is None:
            raise BlockDriverError(self._broken or "No medium found", ENOMEDIUM)
        await image.read_into(offset, buf)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        image = self._img_for_write()
        await image.write(offset, data)
        if fua:
            await image.flush()

    async def write_view(self, offset: int, view: memoryview, fua: bool = False) -> None:
        image = self._img_for_write()
        await image.write(offset, view)
        if fua:
            await image.flush()

    async def write_span(self, offset: int, span: HostSpan, fua: bool = False) -> None:
        image = self._img_for_write()
        cmask = image.cluster_size - 1
        if image.direct or (offset | span.length) & cmask:
            # A part cluster's copy-on-write joins bytes; O_DIRECT aligns them.
            await super().write_span(offset, span, fua)
            return
        await image.write(offset, span)
        if fua:
            await image.flush()

    async def write_zeroes(
        self, offset: int, length: int, may_unmap: bool = False, fua: bool = False
    ) -> None:
        image = self._img_for_write()
        await image.write_zeroes(offset, length, may_unmap)
        if fua:
            await image.flush()

    async def discard(self, offset: int, length: int) -> None:
        image = self._img_for_write()
        if not self.node.discard_unmap:
            return  # QEMU: discard requests are ignored without discard=unmap
        await image.discard(offset, length)

    async def flush(self) -> None:
        image = self._image
        if image is None:
            if self._broken is not None:
                raise BlockDriverError(self._broken, ENOMEDIUM)
            return
        if self.node.state is not NodeState.ACTIVE:
            return
        await image.flush()

    def has_pending_writes(self) -> bool:
        image = self._image
        return (image is not None and image.writable and image.broken is None
                and not image.idle())

    async def truncate(self, size: int) -> None:
        image = self._img_for_write()
        await image.truncate(size)
        self._size = image.size
        for bitmap in self.node.dirty_bitmaps.values():
            if bitmap.size != image.size:
                bitmap.resize(image.size)  # stored with the new size at close
        config = cache_config(self._options, image.size, image.cluster_size)
        image.l2cache.capacity = max(
            config.l2_entries * config.l2_entry_size // image.slice_bytes, 2)

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        image = self._img()
        status = await image.block_status(offset, length)
        if status.data and status.offset is not None and await self._preallocated(image):
            return replace(status, recurse=True)
        return status

    async def _preallocated(self, image: Qcow2Image) -> bool:
        """QEMU's qcow2_detect_metadata_preallocation, once per opened image: far
        more clusters are referenced than the file really holds, so data
        clusters may be holes in the file (which then read as zeros)."""
        if self._prealloc is not None and self._prealloc[0] is image:
            return self._prealloc[1]
        child = self.node.file
        real = child.driver.allocated_size() if child is not None else None
        found = False
        if child is not None and real is not None:
            real_clusters = real // image.cluster_size
            threshold = max(real_clusters * 10 // 9, real_clusters + 2)
            end = -(-child.size() // image.cluster_size)
            found = await image.refs.count_referenced(end, threshold) >= threshold
        self._prealloc = (image, found)
        return found

    def host_file(self, offset: int, length: int) -> tuple[int, int] | None:
        """Where the range lies in the host file, if it is one run of normal
        clusters whose L2 entries are cached (no I/O here: it is synchronous).

        Like any read, the answer is only as stable as the guest's use of the
        range: a concurrent discard may free the clusters.
        """
        image = self._image
        child = self.node.file
        if image is None or child is None or image.broken is not None or length <= 0:
            return None
        if self.node.state is NodeState.INACTIVE:
            return None  # its L2 cache is not to be trusted (refresh_inactive)
        if offset < 0 or offset + length > image.size:
            return None
        host = image.host_run(offset, length)
        if host is None:
            return None
        return child.driver.host_file(host, length)

    # --- activation ---------------------------------------------------------------------

    async def inactivate(self) -> None:
        """Write everything back and stop writing (``qcow2_inactivate``)."""
        image = self._image
        # a fatally corrupt image has nothing to write back (QEMU: no driver);
        # the graph refuses new writes meanwhile (NodeState.INACTIVATING)
        if image is not None and image.writable and image.broken is None:
            # Nothing dirty, nothing in flight, nothing unsynced in the file
            # (the handover's usual case): there is nothing to write back.
            if self._has_bitmaps(image):
                failed = await self._store_or_report(image)
                await image.flush()
                if failed is not None:
                    raise failed  # QEMU: -EINVAL, the node stays active
                # QEMU releases the bitmaps it stored; activation loads them again
                for name in [b.name for b in self.node.dirty_bitmaps.values() if b.stored]:
                    del self.node.dirty_bitmaps[name]
            elif not image.idle() or image.file.driver.has_pending_writes():
                await image.quiesce()
                await image.flush()
            # We never set the dirty bit (no lazy refcounts), so the image is clean.
            image.writable = False

    def rehearse_inactivation(self) -> None:
        # inactivate_now's checks (the same functions), without its change.
        image = self._image
        if image is not None and image.writable and image.broken is None:
            if not image.idle() or image.file.driver.has_pending_writes():
                return
            self._has_bitmaps(image)

    def inactivate_now(self) -> bool:
        image = self._image
        if image is not None and image.writable and image.broken is None:
            if (not image.idle() or image.file.driver.has_pending_writes()
                    or self._has_bitmaps(image)):
                return False  # bitmaps to store: the async path
            image.writable = False  # clean: see inactivate
        return True

    async def invalidate_cache(self) -> None:
        """Drop all mutable metadata and load it again from disk (activation)."""
        image = self._image
        if image is not None and image.writable and image.broken is None:
            # Activation of a node that was never inactivated: like QEMU's
            # qcow2_do_close, write our own state back first.
            await image.flush()
        reload = self.begin_reload()
        if reload is not None:
            await reload.finish(await reload.start(self.node.graph.run_io))
            return
        self._activations += 1
        self._image = None
        try:
            await self._load()
        except (Qcow2FormatError, BlockDriverError, OSError) as exc:
            self._reload_failed(exc)
        self._broken = None

    def _reload_failed(self, exc: Exception) -> NoReturn:
        self._broken = f"Could not reopen qcow2 layer: {exc}"
        self._image = None
        errno = getattr(exc, "errno", None) or 5
        raise BlockDriverError(self._broken, errno) from None

    def begin_reload(self) -> CacheReload | None:
        """The header, L1 and refcount tables read in one job over the file
        child's blocking reads; the L2 and refcount caches go with the old
        image, dropped here."""
        image = self._image
        if image is not None and image.writable and image.broken is None:
            return None  # it has its own state to write back first
        node = self.node
        child = node.file
        read = child.driver.blocking_reader() if child is not None else None
        if child is None or read is None:
            return None
        # The dropped image's refcount table (nothing reads it any more: it is
        # no part of a read's path) takes the new one, in pages already in use.
        spare = image.refs.reftable if image is not None else None
        self._activations += 1
        self._image = None
        config_for = self._config_for
        writable = not node.read_only

        def run() -> tuple[LoadedMetadata, int, int] | Exception:
            try:
                return read_metadata_blocking(read, config_for, writable, spare)
            except (Qcow2FormatError, BlockDriverError, OSError) as exc:
                return exc

        async def finish(outcome: tuple[LoadedMetadata, int, int] | Exception) -> None:
            if isinstance(outcome, Exception):
                self._reload_failed(outcome)
            loaded, reads, nbytes = outcome
            child.stats.rd_operations += reads
            child.stats.rd_bytes += nbytes
            try:
                self._install(await Qcow2Image.from_metadata(
                    node, ImageFile(child), loaded, writable, node.active))
            except (Qcow2FormatError, BlockDriverError, OSError) as exc:
                self._reload_failed(exc)
            self._broken = None

        return CacheReload(run, finish, waits=not child.driver.reads_cached())

    async def refresh_inactive(self) -> None:
        """An inactive node trusts nothing it cached: load the header and tables
        again for each request (another host may be writing the image).

        Always as an inactive, read-only image; installed only if the node is
        still inactive and no activation began meanwhile (it reloads for
        itself: what this read may be older than the source's last writes)."""
        activations = self._activations
        try:
            image = await self._read_image(False, False)
        except (Qcow2FormatError, _OptionError, OSError) as exc:
            raise BlockDriverError(f"Could not read qcow2 metadata: {exc}",
                                   getattr(exc, "errno", None) or 5) from None
        if activations == self._activations and self.node.state is NodeState.INACTIVE:
            self._install(image)

    # --- information ------------------------------------------------------------------------

    def size(self) -> int:
        image = self._image
        return image.size if image is not None else self._size

    def allocated_size(self) -> int | None:
        child = self.node.file
        return child.driver.allocated_size() if child is not None else None

    def cache_stats(self) -> dict[str, tuple[int, int]]:
        image = self._image
        if image is None:
            return {}
        return {"l2": (image.l2cache.hits, image.l2cache.misses),
                "refcount": (image.refs.cache.hits, image.refs.cache.misses)}

    def raw_backing_file_name(self) -> str | None:
        """The backing file name exactly as stored in the header (None without one)."""
        return self._header.backing_file if self._header is not None else None

    def auto_backing_file(self) -> str:
        return self.raw_backing_file_name() or ""

    def backing_file_name(self) -> str | None:
        """The backing file to open: the header's name resolved against the
        directory of the image, as QEMU does (``bdrv_get_full_backing_filename``)."""
        name = self.raw_backing_file_name()
        if name is None:
            return None
        return path_combine(self.filename(), name)

    full_backing_file_name = backing_file_name

    def backing_format(self) -> str | None:
        """The backing format from the header extension (None if absent)."""
        return self._header.backing_format if self._header is not None else None

    async def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        """qcow2_change_backing_file: the header's backing name and format, rewritten."""
        image = self._image
        if image is None or not image.writable:
            raise BlockDriverError("Permission denied", errno_codes.EACCES)
        if name is not None and len(name.encode("utf-8", "surrogateescape")) > 1023:
            raise BlockDriverError("Invalid argument", errno_codes.EINVAL)
        hdr = image.header
        hdr.backing_file = name or None
        hdr.backing_format = (fmt or None) if name else None
        await write_header_cluster(image)

    def snapshots(self) -> list[dict[str, object]]:
        image = self._image
        return [s.info() for s in image.snapshots] if image is not None else []

    def image_info(self) -> dict[str, Any]:
        hdr = self._header
        if hdr is None:
            return {}
        info: dict[str, Any] = {
            "cluster-size": hdr.cluster_size,
            "dirty-flag": bool(hdr.incompatible_features & INCOMPAT_DIRTY),
        }
        compression = COMPRESSION_NAMES.get(hdr.compression_type, "zlib")
        data: dict[str, Any]
        if hdr.version < 3:
            data = {"compat": "0.10", "compression-type": compression,
                    "refcount-bits": hdr.refcount_bits}
        else:
            corrupt = bool(hdr.incompatible_features & INCOMPAT_CORRUPT)
            if self._image is not None:
                corrupt = corrupt or self._image.corrupt
            data = {
                "compat": "1.1",
                "compression-type": compression,
                "lazy-refcounts": bool(hdr.compatible_features & COMPAT_LAZY_REFCOUNTS),
                "refcount-bits": hdr.refcount_bits,
                "corrupt": corrupt,
                "extended-l2": bool(hdr.incompatible_features & INCOMPAT_EXTL2),
            }
        info["format-specific"] = {"type": "qcow2", "data": data}
        if hdr.backing_file is not None:
            info["backing-filename"] = hdr.backing_file
            info["full-backing-filename"] = self.backing_file_name()
            if hdr.backing_format:
                info["backing-filename-format"] = hdr.backing_format
        return info
