"""The C allocator of a dt process keeps the large buffers it frees, to use them again.

dt handles data in buffers of up to a few MiB: file data read for the mirror, encoded
records, records read back from the log (engine/log_segments.py returns each payload as
the bytes object the kernel filled). With glibc's defaults, a freed buffer of that size
goes back to the kernel (munmap, or a trim of the heap's top) and the next one is new
memory: mapped, faulted in and zeroed page by page. On this project's development VM a
new page costs about 3 us; reading 6 GB as batches of eight 1 MiB records took 5.9-6.8 s
of which 5.4-5.8 s in the kernel, and 1.2-1.8 s with the settings below.

``keep_freed_buffers`` raises both thresholds once, at process start: allocations up to
``MMAP_THRESHOLD`` come from the heap, and up to ``TRIM_THRESHOLD`` of free memory at its
top stays with the process. Setting them also stops glibc's own adjustment of the two.
Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes

MMAP_THRESHOLD = 32 << 20  # glibc's upper bound for it on 64-bit systems
TRIM_THRESHOLD = 64 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h


def keep_freed_buffers() -> bool:
    """Apply the thresholds; True when the allocator took them."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
