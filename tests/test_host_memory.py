"""retain_freed_host_memory: big tensors come from (and go back to) malloc's heap, not fresh mmaps."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import REPO

# in a fresh process: mmapped bytes (mallinfo2.hblkhd) while a 64 MiB tensor is alive, and the heap's
# free bytes (fordblks) after it is freed
PROBE = """
import ctypes, sys, torch
from epmoe.host_memory import retain_freed_host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "retain":
    assert retain_freed_host_memory()
before = libc.mallinfo2().hblkhd
x = torch.empty(16 << 20)  # 64 MiB of fp32
mapped = libc.mallinfo2().hblkhd - before
del x
print(mapped >> 20, libc.mallinfo2().fordblks >> 20)
"""


def _probe(mode: str) -> tuple[int, int]:
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    mapped_mib, heap_free_mib = map(int, proc.stdout.split())
    return mapped_mib, heap_free_mib


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (Linux)")
def test_freed_big_tensors_stay_in_the_heap_for_reuse() -> None:
    mapped, heap_free = _probe("default")
    assert mapped >= 64 and heap_free < 64  # glibc's default: a fresh mmap, unmapped on free
    mapped, heap_free = _probe("retain")
    assert mapped == 0 and heap_free >= 64  # from the heap, and kept there once freed
