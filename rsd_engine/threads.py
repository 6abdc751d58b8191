"""CPU threads: passive OpenMP waiting, and a thread count set for torch and OpenMP together.

The trap: OpenMP threads busy-wait (spin) after each parallel region, by default for about a
millisecond. A decode step is hundreds of small parallel regions; when other processes share the cores,
a spinning thread burns the time slice its partner needs to reach the next barrier, and a step runs
10-100x slower than on one thread (issue 9: `rsd generate` 9x slower, a B=1 fused step 52 ms against
0.24 ms). With OMP_WAIT_POLICY=PASSIVE a waiting thread sleeps at once: under load two threads cost
about what one does, instead of collapsing.

The OpenMP runtime reads the variable once, when torch loads it, so `import rsd_engine` sets it (unless
the user did) only if torch is not imported yet; the `rsd` command always imports it first. A program that
imports torch before rsd_engine keeps OpenMP's default: set OMP_WAIT_POLICY=PASSIVE in its environment.
The cost: on an idle machine a sleeping thread wakes late, so passive waiting is about 40% slower at
batch 1 and 15% at batch 8 than busy-waiting (demo pair, 2 threads); shared machines are the common case,
and OMP_WAIT_POLICY=ACTIVE in the environment restores spinning where the cores are yours.
This module must not import torch at import time.
"""
from __future__ import annotations

import os
import sys

WAIT_POLICY = "PASSIVE"


def prefer_passive_waiting() -> bool:
    """Ask OpenMP for passive waiting unless the user chose a policy or torch (and so OpenMP) is loaded
    already; True when the policy in the environment is passive."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
    return os.environ.get("OMP_WAIT_POLICY", "").upper() == WAIT_POLICY


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's or taskset's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """torch's count (by default one per physical core), but no more than the CPUs this process may use."""
    import torch

    return max(1, min(torch.get_num_threads(), usable_cpus()))


def set_threads(n: int | None = None) -> int:
    """Use ``n`` CPU threads (None: default_threads) for torch's intra-op pool, MKL and OpenMP (the C++
    sampler reads torch's count), and pass the count to child processes via OMP_NUM_THREADS."""
    import torch

    n = default_threads() if n is None else n
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"threads = {n!r}: must be an integer >= 1")
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    return n

