"""tuning.tune_allocator(): socket reads of asyncio's size stop faulting in fresh pages.

Each case runs in a fresh interpreter (malloc settings are process-wide): it reads 2000 small
messages with recv(256 KiB), as asyncio does, and reports the minor page faults this caused.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
READS = 2000

SCRIPT = f"""
import resource, socket, sys
sys.path.insert(0, {str(ROOT)!r})
if sys.argv[1] == "tuned":
    import tuning
    assert tuning.tune_allocator(), "mallopt refused"
a, b = socket.socketpair()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({READS}):
    a.send(b"x" * 300)
    b.recv(256 * 1024)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], check=True, capture_output=True, text=True)
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_receive_buffers_come_from_the_heap_once_tuned():
    untuned = page_faults("plain")
    if untuned < READS // 2:
        pytest.skip(f"this C library does not map receive buffers per read here ({untuned} faults)")
    tuned = page_faults("tuned")
    assert tuned < READS // 20, f"{tuned} page faults for {READS} reads once tuned ({untuned} without)"
