"""Keep freed host memory for reuse instead of handing it back to the kernel (docs/reference.md, "Host memory").

glibc's malloc serves blocks above a (dynamic) threshold with fresh ``mmap`` calls and returns free
memory at the top of its heap to the kernel once it exceeds a trim threshold. A CPU training step
frees and reallocates the same activations every step, so by default each step pays a page fault
per 4 KiB page it touches again (8,192 faults for 32 MiB of activations). Fixing both thresholds
keeps the memory of one step for the next; the arithmetic is unchanged, only the allocator's
bookkeeping. The price is that a process keeps up to its peak footprint until it exits.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameters from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc accepts at most 32 MiB for the mmap threshold on 64-bit systems; larger blocks stay mmap'ed
MMAP_THRESHOLD_BYTES = 32 * 2**20
# Above a step's transient memory (about 80 MiB for the digits ConvNet at batch 256), so a step's
# frees never trim the heap.
TRIM_THRESHOLD_BYTES = 2**30


def glibc():
    """The process's C library when it is glibc (Linux), else None (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; True when set, False where not glibc."""
    libc = glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
