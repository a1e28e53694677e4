"""Keep freed host memory for reuse, so that big CPU tensors cost no page faults every step.

Why: glibc's malloc serves blocks above its mmap threshold (at most 32 MiB by default) with a
fresh mmap and unmaps them on free. Every step of a fine-grained MoE layer allocates tensors of
T*K rows (128 MiB each at 8192 tokens, top-8, width 512: sorted rows, exchange buffers, expert
outputs and their gradients), so every step the kernel faults in and zeroes them page by page
again: 80 ms for a 128 MiB tensor written once on this project's 2-core machines, against 15 ms
when the block comes back from the heap. Raising the mmap threshold (and the heap's trim
threshold) makes freed blocks stay in the process for the next step, as torch's CUDA caching
allocator does for GPU memory. The cost: the process keeps its peak host memory until it exits.

glibc only (Linux); elsewhere nothing changes and `retain_freed_host_memory` says so. The
training program calls it first thing; `expert_impl=auto` asks `host_memory_retained` (the
fastest CPU path for big sorted rows depends on it, see model/experts.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MAX_BLOCK_BYTES = 1 << 30  # blocks up to this size come from the heap and go back to it


@functools.cache
def retain_freed_host_memory() -> bool:
    """Make this process's malloc keep freed blocks up to 1 GiB; True where it could (glibc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc: no mallopt
        return False
    # NOTE: mallopt returns 1 on success; the trim threshold first, so the heap never shrinks below a kept block
    return bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1)) and bool(mallopt(M_MMAP_THRESHOLD, MAX_BLOCK_BYTES))


def host_memory_retained() -> bool:
    """Whether `retain_freed_host_memory` took effect in this process (asking applies nothing)."""
    return retain_freed_host_memory.cache_info().currsize > 0 and retain_freed_host_memory()
