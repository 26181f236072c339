"""Keep freed memory in the process while training (glibc's malloc), instead of handing it back each step.

A training step allocates and frees the same few hundred tensors of a few MB every time. glibc returns
the freed top of its heap to the system once it exceeds its trim threshold and serves large blocks with
fresh ``mmap`` calls, so the next step touches new pages: every 4 KB page is a page fault and a zeroing
by the kernel, which costs most inside a virtual machine. A MiniLM P-Tuning v2 run (8 steps of 32 x 128
rows, bf16) took 437,665 minor page faults with glibc's defaults and 218,905 with the settings below
(``/usr/bin/time -v``), and its steps measured faster (``python bench/malloc.py``).

:func:`keep_freed_memory` raises the mmap threshold to glibc's ceiling (32 MB: smaller blocks come from
the heap) and the trim threshold to 2 GB, mallopt's largest (the heap keeps up to that much of what it
grew to). The process's peak memory is unchanged (the memory is in use at the peak anyway); only its
release between steps is skipped. Elsewhere (macOS, musl, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_CEILING = 32 << 20  # glibc refuses a larger mmap threshold (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as above; True where it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_CEILING)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM))
