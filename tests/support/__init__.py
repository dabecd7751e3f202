"""Test support shared by every test directory: the QMP client and QEMU's tools."""
