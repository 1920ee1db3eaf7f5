"""Atomic text files for callbacks (``serialization.atomic_write``: a temporary file, then ``os.replace``)."""
from __future__ import annotations

from ..serialization import atomic_write


def atomic_write_text(path: str, text: str) -> None:
    """Replace ``path`` by ``text`` in one step (call it on the writing rank only)."""
    atomic_write(path, lambda fh: fh.write(text), mode="w")
