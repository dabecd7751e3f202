"""Hypothesis strategies shared by the property tests."""

from __future__ import annotations

from hypothesis import strategies as st


def is_qemu_char(ch: str) -> bool:
    """QEMU's JSON parser refuses surrogates and the Unicode noncharacters."""
    cp = ord(ch)
    return not (0xD800 <= cp <= 0xDFFF or 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE)


def qemu_text(max_size: int | None = None) -> st.SearchStrategy[str]:
    """Text that QEMU's JSON parser accepts in a string (keys and values alike)."""
    return st.text(alphabet=st.characters().filter(is_qemu_char), max_size=max_size)
