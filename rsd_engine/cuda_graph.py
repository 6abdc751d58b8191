"""Replay a decode step as a CUDA graph per batch-size bucket (DESIGN.md §5; nano-vllm's capture loop).

``step(inputs) -> outputs`` takes a dict of batch-major tensors and returns a tensor, or a tuple, list or
dict of batch-major tensors. It must have static shapes and no host syncs (the fused samplers and the
counter-based uniforms are built for that). On CPU the wrapper simply calls ``step``.

Capturing runs ``step`` once per bucket for warm-up (Triton compiles, cuBLAS picks algorithms): that
run has its side effects (cache writes, step counters), so capture before serving and reset state
after. Rows past the real batch are padding: they are filled with ``padding[name]`` (default 0) and
``step`` must leave real state alone for them (e.g. point their cache slot at a spare slot).
Outputs are views of the graph's static buffers, valid until the next call.
"""
from __future__ import annotations

import torch


class CudaGraphStep:
    def __init__(self, step, example_inputs: dict[str, torch.Tensor], buckets=(1, 2, 4, 8, 16, 32, 64, 128),
                 padding: dict[str, float | int] | None = None):
        sizes = {name: t.shape[0] for name, t in example_inputs.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"example inputs must share their first (batch) dimension, got {sizes}")
        max_batch = next(iter(sizes.values()))
        self.step = step
        self.padding = padding or {}
        self.buckets = sorted({b for b in buckets if 0 < b < max_batch} | {max_batch})
        self.enabled = all(t.is_cuda for t in example_inputs.values())
        self.graphs = {}  # bucket -> (graph, static inputs, static outputs)
        if not self.enabled:
            return
        static = {name: t.clone() for name, t in example_inputs.items()}
        pool = None
        # Largest first: smaller graphs then fit inside the memory pool the largest one reserved.
        for bucket in reversed(self.buckets):
            inputs = {name: t[:bucket] for name, t in static.items()}
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step(inputs)  # warm-up outside the graph: lazy initialisation must not be captured
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                outputs = step(inputs)
            pool = graph.pool() if pool is None else pool
            self.graphs[bucket] = (graph, inputs, outputs)
        torch.cuda.synchronize()

    def __call__(self, inputs: dict[str, torch.Tensor]):
        if not self.enabled:
            return self.step(inputs)
        batch = next(iter(inputs.values())).shape[0]
        bucket = next((b for b in self.buckets if b >= batch), None)
        if bucket is None:
            raise ValueError(f"batch of {batch} rows exceeds the largest captured bucket {self.buckets[-1]}")
        graph, static, outputs = self.graphs[bucket]
        for name, t in inputs.items():
            static[name][:batch].copy_(t)
            static[name][batch:].fill_(self.padding.get(name, 0))
        graph.replay()
        return _rows(outputs, batch)


class SelfFeedingGraphs:
    """One CUDA graph per batch bucket of ``step(bucket)``, a step whose inputs and outputs are static
    buffers of its own (step.py's StepState): it reads the first ``bucket`` rows, writes its outputs and
    moves the rows on, so a replay needs no copies in or out. ``__call__(rows)`` replays the smallest
    bucket holding ``rows`` and returns it. Capture runs each bucket once for warm-up: the caller makes
    every row padding meanwhile (StepState.padded). Without CUDA (``enabled=False``) it calls ``step(rows)``.
    """

    def __init__(self, step, buckets, *, enabled: bool):
        self.step = step
        self.buckets = sorted(buckets)
        self.enabled = enabled
        self.graphs = {}
        if not enabled:
            return
        pool = None
        for bucket in reversed(self.buckets):  # largest first, as CudaGraphStep
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step(bucket)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                step(bucket)
            pool = graph.pool() if pool is None else pool
            self.graphs[bucket] = graph
        torch.cuda.synchronize()

    def __call__(self, rows: int) -> int:
        if not self.enabled:
            self.step(rows)
            return rows
        bucket = next((b for b in self.buckets if b >= rows), None)
        if bucket is None:
            raise ValueError(f"batch of {rows} rows exceeds the largest captured bucket {self.buckets[-1]}")
        self.graphs[bucket].replay()
        return bucket


def _rows(outputs, n):
    if isinstance(outputs, torch.Tensor):
        return outputs[:n]
    if isinstance(outputs, dict):
        return {name: _rows(t, n) for name, t in outputs.items()}
    rows = [_rows(t, n) for t in outputs]
    return type(outputs)(*rows) if hasattr(outputs, "_fields") else type(outputs)(rows)  # NamedTuple or not
