"""Counter-based uniforms (DESIGN.md §3).

The uniform for draw ``d`` of request ``seed`` at generation step ``t`` is a pure function of
``(seed, t, d)``: no generator state, so it does not depend on batch size, position in the batch or
which backend samples. It is computed with integer tensor ops on the device, from an on-device step
counter, so a decode step needs no host round trip and can be captured in a CUDA graph.

Draw layout of one step: column 0 is the student fallback draw, column ``1 + k`` the k-th teacher
proposal. Values lie in (0, 1]: ``(h >> 8 + 1) / 2**24``, exact in float32.
"""
from __future__ import annotations

import functools

import torch
from torch._subclasses.fake_tensor import FakeTensor

from .params import MAX_PROPOSAL_TRIALS

NUM_DRAWS = 1 + MAX_PROPOSAL_TRIALS
FALLBACK_DRAW = 0

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit avalanche finaliser on int64 lanes. Multipliers stay below 2**31 so that every
    # product of a 32-bit lane fits in a signed int64: no overflow anywhere, on any backend.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    x = x ^ (x >> 16)
    return x


# Whether CPU tensors take the Triton kernels (under the interpreter) instead of the torch ops, for the uniforms
# and the step's advance (engine.py): tests only.
KERNEL_ON_CPU = False


def step_uniforms(seeds: torch.Tensor, steps: torch.Tensor, num_draws: int = NUM_DRAWS) -> torch.Tensor:
    """Uniforms ``[B, num_draws]`` float32 for requests ``seeds [B]`` (int64) at ``steps [B]`` (int64).
    On CUDA one launch of kernels/uniforms.py; elsewhere ``step_uniforms_torch``, its reference."""
    if seeds.is_cuda or KERNEL_ON_CPU:
        return uniforms_triton(seeds, steps, 1, num_draws)[:, 0]
    return step_uniforms_torch(seeds, steps, num_draws)


def step_uniforms_torch(seeds: torch.Tensor, steps: torch.Tensor, num_draws: int = NUM_DRAWS) -> torch.Tensor:
    """The reference of the uniforms, in torch ops (plain torch: it compiles under torch.compile on CPU)."""
    seeds = seeds.to(torch.int64)
    steps = steps.to(torch.int64)
    draws = torch.arange(num_draws, device=seeds.device, dtype=torch.int64)
    h = torch.full_like(seeds, 0x6A09E667)
    for word in (seeds & _M32, (seeds >> 32) & _M32, steps & _M32, (steps >> 32) & _M32):
        h = _mix32(h ^ word)
    h = _mix32(h[:, None] ^ draws[None, :])
    h = _mix32(h ^ 0x3C6EF372)
    return ((h >> 8) + 1).to(torch.float32) * (1.0 / 2**24)


# A speculative round (DESIGN.md §8) spans positions t0 .. t0 + G, one per generated-token index. Each
# position has its own columns: the plain step's [fallback, proposal 0 .. K-1] (the bonus token is drawn
# with them, exactly as a plain step would), then one column each for the student's draft, the keep test,
# the residual draw after a rejection, and the posterior `accepted` flag. A plain step at position t and
# a speculative round covering t read the same first NUM_DRAWS columns.
DRAFT_DRAW = NUM_DRAWS
KEEP_DRAW = NUM_DRAWS + 1
RESIDUAL_DRAW = NUM_DRAWS + 2
FLAG_DRAW = NUM_DRAWS + 3
NUM_ROUND_DRAWS = NUM_DRAWS + 4


def round_uniforms(seeds: torch.Tensor, start_steps: torch.Tensor, num_positions: int) -> torch.Tensor:
    """Uniforms ``[B, num_positions, NUM_ROUND_DRAWS]`` float32 for a round starting at ``start_steps [B]``:
    position ``i`` of row ``b`` holds ``step_uniforms(seeds[b], start_steps[b] + i, NUM_ROUND_DRAWS)``."""
    if seeds.is_cuda or KERNEL_ON_CPU:
        return uniforms_triton(seeds, start_steps, num_positions, NUM_ROUND_DRAWS)
    seeds = seeds.to(torch.int64)
    steps = start_steps.to(torch.int64)[:, None] + torch.arange(num_positions, device=seeds.device)
    flat = step_uniforms_torch(seeds[:, None].expand(-1, num_positions).reshape(-1), steps.reshape(-1), NUM_ROUND_DRAWS)
    return flat.view(seeds.shape[0], num_positions, NUM_ROUND_DRAWS)


def uniforms_triton(seeds: torch.Tensor, start_steps: torch.Tensor, num_positions: int, num_draws: int) -> torch.Tensor:
    """``[B, num_positions, num_draws]``: the uniforms of steps ``start_steps + position``, in one launch."""
    B = seeds.shape[0]
    out = torch.empty((B, num_positions, num_draws), dtype=torch.float32, device=seeds.device)
    seeds, start_steps = seeds.to(torch.int64).contiguous(), start_steps.to(torch.int64).contiguous()
    if isinstance(out, FakeTensor) or out.numel() == 0:
        return out  # traced under FakeTensorMode: the shape is all a trace needs
    block = 256
    grid = (-(-out.numel() // block),)
    _uniforms_kernel()[grid](seeds, start_steps, out, out.numel(), num_positions, num_draws, BLOCK=block, num_warps=4)
    return out


@functools.cache
def _uniforms_kernel():
    from .sampling.triton import import_kernel  # not at import time: CPU-only users never load Triton

    return import_kernel("uniforms").uniforms_kernel
