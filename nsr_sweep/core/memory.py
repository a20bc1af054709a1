"""Memory a long process has let go, handed back to the system (a launch's last steps on a layer's table)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import lru_cache


@lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def give_back() -> None:
    """Collect cycles and return the freed heap to the system: glibc keeps the memory of many mid-sized frees (a
    layer's arrays, a table's columns) in its heap, where the process's size counts it, unless trimmed. A no-op
    where the C library has no `malloc_trim` (macOS, musl)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    import pyarrow as pa

    pa.default_memory_pool().release_unused()  # Arrow's own pool keeps what it freed too
