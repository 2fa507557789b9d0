"""Process-wide tuning for a long-running asyncio server: glibc's malloc thresholds.

Why: asyncio reads every socket with `sock.recv(256 KiB)`, which allocates a 256 KiB buffer and
shrinks it to what arrived. 256 KiB is above glibc's default mmap threshold (128 KiB), so each
read can become mmap + mremap + munmap: three system calls and a fresh zeroed page, for a Twilio
message of 300 bytes. glibc raises the threshold by itself only after it frees a large mapped
block, which happens at start-up by accident or not at all. We measured both cases on the same
code: 39 and 48 µs of CPU per media frame, the difference all kernel time (strace: one mmap,
mremap and munmap per recvfrom). Setting the thresholds makes the fast case the only case.

M_MMAP_THRESHOLD 1 MiB: the receive buffers come from the heap. M_TRIM_THRESHOLD 8 MiB: the
heap is not shrunk (brk) after every read that freed its top. Both are upper bounds on memory
kept, not allocations. On a C library other than glibc (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20
TRIM_THRESHOLD = 8 << 20


def tune_allocator() -> bool:
    """Set glibc's malloc thresholds (see the module docstring); False where there is no glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.debug("no mallopt() in this C library; malloc thresholds left as they are")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.warning("mallopt() refused the malloc thresholds; socket reads may cost extra system calls")
    return ok
