"""Memory the process frees stays in the process for the next step (glibc's malloc on Linux).

glibc serves every allocation above its mmap threshold (at most 32 MB, the default's ceiling)
with a fresh mmap and gives it back at free; the trailing free part of the heap it trims. A
training step allocates and frees the same large activations every step, so each step faulted
its memory in again: on the 2-core AMD EPYC of benchmarks/results a (10368 x 128) @ (128 x 512)
matrix product took 16.3 ms into fresh memory and 8.2 ms into reused memory, and half of a
training step of the paper's configuration was page faults (minor faults 5.7 M -> 1.0 M over a
benchmark run, 6.9 -> 3.3 s per step). Served from the heap and never trimmed, freed memory is
reused instead: the resident set stays at the peak the process reached, plus what the heap's
fragmentation holds (4.2 against 3.2 GB in the paper's configuration). Under imt_recompute, the
memory-bound choice, the heap's free top is still given back: 1.93 against 2.08 GB, at 6% more
time per step. Other C libraries and systems are left as they are.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
NEVER = 2**31 - 1  # mallopt takes an int: 2 GiB, above any one activation here
GLIBC_TRIM_THRESHOLD = 128 * 1024  # glibc's default: the heap's free top above it is given back


def keep_freed_memory(trim_heap: bool = False) -> bool:
    """Large allocations from the heap, under glibc, and the heap never trimmed unless
    ``trim_heap``; whether it was set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt with these parameters
        return False
    # Both set on every call: a later run in the same process (the tests) gets its own choice.
    return bool(mallopt(M_MMAP_THRESHOLD, NEVER)) and bool(mallopt(M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD if trim_heap else NEVER))
