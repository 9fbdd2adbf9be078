"""tools/allocator.py: freed large buffers are used again instead of new memory.

Counted as the kernel counts it: the minor page faults of a process that allocates a
batch of eight 1 MiB buffers and frees it, 50 times (as the applier reads batches of
records). With glibc's defaults a freed batch is often trimmed off the heap (11,800
faults here) and the next one faults in new pages; kept memory faults in once (2,000).
"""

from __future__ import annotations

import subprocess
import sys

CHURN = """
import resource, sys
from datatether.tools import allocator
if sys.argv[1] == "kept":
    assert allocator.keep_freed_buffers()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    batch = [bytes(1 << 20) for _ in range(8)]
    del batch
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], check=True, capture_output=True, text=True)
    return int(out.stdout)


def test_freed_buffers_are_used_again():
    new_each_time = faults("default")
    kept = faults("kept")
    assert kept < 3 * 2048  # the batch's pages, faulted in once (and the interpreter's few)
    assert new_each_time > 4 * kept
