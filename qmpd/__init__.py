"""qmpd: a QMP-speaking block-device daemon compatible with QEMU 7.2."""

__version__ = "0.1.0"
