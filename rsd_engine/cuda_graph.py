"""Replay a decode step as a CUDA graph per batch-size bucket (DESIGN.md §5, §10; nano-vllm's capture loop).

The step reads its inputs from static buffers, writes its outputs to one, and moves its rows on in
place (step.py's StepState): a replay needs no copy in and no copy out, and a graph serves every
step of its bucket. The step must have static shapes and no host syncs (the fused samplers and the
counter-based uniforms are built for that).

Capturing runs the step once per bucket for warm-up (Triton compiles, cuBLAS picks algorithms): that
run has its side effects (cache writes, the rows moving on), so the caller makes every row padding
while capturing (StepState.padded), whose rows write only the spare scratch slot and stay put.
"""
from __future__ import annotations

import torch


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
        # Largest first: smaller graphs then fit inside the memory pool the largest one reserved.
        for bucket in reversed(self.buckets):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step(bucket)  # warm-up outside the graph: lazy initialisation must not be captured
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
