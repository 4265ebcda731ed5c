"""The C allocator's part in a worker's memory (issue 17, measured in bench/README.md).

glibc serves an allocation below its mmap threshold from its heaps and keeps freed heap memory
for reuse; the threshold also rises to the size of any mmapped block that is freed (up to
32 MB), so after the first module the merge's tensors of a few MB land on the heap and the
freed ones stay in the process. Measured on one round of 8 modules of 4096² with 50 clients:
≈ 270 MB held free by glibc after the norm screening, and the heap grew module by module.
A fixed threshold (which also turns off the dynamic one) hands every block of 128 KiB or more
back to the kernel when it is freed; `release_free_memory` returns what the heaps still hold
free. Both are no-ops where the C library is not glibc."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc malloc.h)
MMAP_THRESHOLD = 128 << 10  # glibc's initial default, kept fixed


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve blocks of `threshold` bytes or more from mmap for the rest of the process, so a
    freed tensor's memory goes back to the kernel. True when the C library took the setting."""
    libc = _libc()
    if libc is None:
        log.info("not glibc: the allocator's mmap threshold is left as it is")
        return False
    return bool(libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(threshold)))


def release_free_memory() -> None:
    """Return the free memory the C allocator's heaps hold to the kernel (glibc malloc_trim)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(ctypes.c_size_t(0))
