"""Live migration: QEMU's stream format (:mod:`qmpd.migration.stream`) and its users."""
