"""Counts what the Triton sampler kernels do, under TRITON_INTERPRET=1: the cost model of issue 14 that
needs no GPU.

Inside ``count_costs(*logit_tensors)`` every kernel launch is recorded (kernel name, grid) and, per
program of each launch, every load is inspected: a load whose addresses fall in one of the given logit
tensors is one *dependent block step* of that program (each loop iteration of the kernels streams one
tile of a row, and the next iteration depends on it through the running partials), and the bytes it
reads are the program's logit bytes. Every reduction or scan over more elements than a warp holds (32)
is one *collective* of that program: on the GPU each is a cross-warp exchange through shared memory
with a barrier, about a microsecond of latency however little data it moves, so the collectives of a
launch's slowest program, summed over the launches, model the latency of a call that moves little data
(B = 1). Atomic read-modify-writes are counted per active lane: each is an L2 transaction, serialised
with the others on its address (the histograms' popular bins), the suspected limit of the row-wide rounds
at large B. The counts come from the interpreter running the real kernels, so they follow any change of
tile sizes, chunk table or loop structure.
"""
from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
from triton.runtime import interpreter  # noqa: E402


@dataclass
class Launch:
    name: str
    grid: tuple
    steps: dict = field(default_factory=lambda: defaultdict(int))  # program -> logit tile loads
    bytes: dict = field(default_factory=lambda: defaultdict(int))  # program -> logit bytes read
    collectives: dict = field(default_factory=lambda: defaultdict(int))  # program -> block-wide reduce / scan
    atomics: int = 0  # active lanes of atomic read-modify-writes, all programs


@dataclass
class Costs:
    launches: list = field(default_factory=list)
    row_bytes: int = 0  # bytes of one row of every logit tensor together

    @property
    def max_steps(self) -> int:
        """The most dependent block steps any program of any launch took."""
        return max((max(l.steps.values(), default=0) for l in self.launches), default=0)

    @property
    def critical_collectives(self) -> int:
        """Collectives on the call's critical path: the slowest program of each launch, launches in order."""
        return sum(max(l.collectives.values(), default=0) for l in self.launches)

    @property
    def atomics(self) -> int:
        """Atomic read-modify-writes (one per active lane) of the whole call: each is an L2 transaction, and
        those on one address queue behind each other."""
        return sum(l.atomics for l in self.launches)

    def reads_per_row(self, rows: int) -> float:
        """Logit bytes read by the whole call over the bytes of the rows' logits: 1.0 = each row read once."""
        return sum(sum(l.bytes.values()) for l in self.launches) / (rows * self.row_bytes)


@contextlib.contextmanager
def count_costs(*logits):
    ranges = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in logits]
    costs = Costs(row_bytes=sum(t.shape[-1] * t.element_size() for t in logits))
    builder = interpreter.interpreter_builder
    original_call = interpreter.GridExecutor.__call__
    original_masked = interpreter.InterpreterBuilder.create_masked_load

    def record(ptrs, mask):  # create_load goes through create_masked_load too
        if not costs.launches:
            return
        addresses = np.asarray(ptrs.data).reshape(-1)
        live = np.broadcast_to(np.asarray(mask.data), np.asarray(ptrs.data).shape).reshape(-1)
        hits = np.zeros(addresses.shape, dtype=bool)
        for lo, hi in ranges:
            hits |= (addresses >= lo) & (addresses < hi)
        if hits.any():
            launch = costs.launches[-1]
            program = tuple(builder.grid_idx)
            if addresses.size > 1:
                launch.steps[program] += 1
            launch.bytes[program] += int((hits & live).sum()) * ptrs.get_element_ty().primitive_bitwidth // 8

    def call(self, *args, **kwargs):
        grid = self.grid if not callable(self.grid) else None
        costs.launches.append(Launch(self.fn.__name__, tuple(grid) if grid is not None else ()))
        return original_call(self, *args, **kwargs)

    def masked_load(self, ptrs, mask, other, *rest):
        record(ptrs, mask)
        return original_masked(self, ptrs, mask, other, *rest)

    def collective(self, input):
        # apply() wraps a lone tensor in a tuple and calls itself again: count the tuple call only, once per
        # reduction or scan whatever the number of values it carries.
        if costs.launches and isinstance(input, tuple) and int(np.prod(input[0].shape or [1])) > 32:
            costs.launches[-1].collectives[tuple(builder.grid_idx)] += 1
        return original_apply(self, input)

    def atomic_rmw(self, op, ptr, val, mask, *rest):
        if costs.launches:
            costs.launches[-1].atomics += int(np.broadcast_to(np.asarray(mask.data), np.asarray(ptr.data).shape).sum())
        return original_rmw(self, op, ptr, val, mask, *rest)

    original_apply = interpreter.ReduceScanOpInterface.apply
    original_rmw = interpreter.InterpreterBuilder.create_atomic_rmw
    interpreter.InterpreterBuilder.create_atomic_rmw = atomic_rmw
    interpreter.GridExecutor.__call__ = call
    interpreter.InterpreterBuilder.create_masked_load = masked_load
    interpreter.ReduceScanOpInterface.apply = collective
    try:
        yield costs
    finally:
        interpreter.GridExecutor.__call__ = original_call
        interpreter.InterpreterBuilder.create_masked_load = original_masked
        interpreter.ReduceScanOpInterface.apply = original_apply
        interpreter.InterpreterBuilder.create_atomic_rmw = original_rmw
