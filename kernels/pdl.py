"""Programmatic dependent launch (PDL, compute capability 9.0 and later) for the CUDA path's Triton kernels (the
decoder's and the sampler's; the switch is RSD_PDL, rsd_engine/sampling/triton.py).

A decode step is a chain of a few hundred small kernels, one after another on one stream: between two of them
the card finishes the first, flushes it, then launches and schedules the second, about a microsecond or two in
which no SM works. Launched with PDL, a kernel's programs may be scheduled while the kernel before it still
runs, once every program of that one has released its dependents; they then wait at ``griddepcontrol.wait``
until it has completed and its writes are visible. So the launch overlaps the previous kernel's tail and the
gap shrinks to the wait.

Exactness: ``wait_then_release`` comes first in every kernel that takes it, before any load or store, so a
kernel launched this way touches no memory before the kernel before it is complete (and, by the same rule one
launch back, everything before that): reads see every earlier write, and no earlier read sees a later write.
Releasing dependents at once only lets the next kernel be scheduled early; it too waits before touching
memory. A kernel launched without PDL (a torch op, cuBLAS) keeps the stream's plain order. With PDL constexpr
False (the default, CPU, the interpreter, cards before sm_90) the kernels are the same as without this file.
"""
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # Triton before grid dependency control (3.4): the launcher never asks for PDL there
    gdc_launch_dependents = gdc_wait = None
AVAILABLE = gdc_wait is not None


@triton.jit
def wait_then_release(PDL: tl.constexpr):
    if PDL:
        gdc_wait()  # the previous kernel has completed and its writes are visible
        gdc_launch_dependents()  # the next kernel may be scheduled now (it waits the same way)
