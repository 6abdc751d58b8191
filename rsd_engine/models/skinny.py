"""Whether the Triton forward takes its fused skinny-GEMM path (CausalLM.skinny_rows), chosen on the card.

kernels/skinny_linear.py streams a weight once where cuBLAS reaches 27-75% of HBM bandwidth at one row (H200);
with more rows cuBLAS's tiles fill and the skinny kernel's redundant prologue work grows, and where they cross
depends on the card and the shapes. So a probe measures it, once per model and before any graph capture
(CausalLM.new_cache asks on CUDA): the decode forward at 1, 2, 4, 8 and 16 rows by both paths, each captured
as a CUDA graph (else Python's launch overhead is what gets measured) and replayed between CUDA events. The
limit is the largest probed row count up to which the skinny path won at every count: a threshold should not
cover a count where the path lost. The answer is kept per (config, dtype, device) for the process, so the
engines of one benchmark run probe each shape once. RSD_SKINNY_GEMM=on|off|auto (default auto) overrides it (A/B runs).
Off CUDA, auto means off (the interpreter says nothing of speed). A probe that fails (a kernel that does not
compile on this card, say) costs a one-line warning and leaves today's path.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import warnings
from typing import Callable

import torch

from .kv_cache import KVCache

MAX_ROWS = 16  # triton_ops.SKINNY_BLOCK_M: the rows of one dot tile
PROBE_ROWS = (1, 2, 4, 8, 16)
MODES = ("auto", "on", "off")
_probed: dict = {}  # (ModelConfig, dtype, device) -> (limit, times)


def row_limit(model) -> int:
    """The most rows (B*T) the fused skinny path takes for ``model``; 0 = never. Records the probe's times
    (µs per forward, skinny and cuBLAS, by row count) in ``model.skinny_probe``."""
    mode = os.environ.get("RSD_SKINNY_GEMM", "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"RSD_SKINNY_GEMM must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off" or getattr(model, "use_triton", None) is False:  # no Triton forward, nothing to choose
        return 0
    if model.device.type != "cuda":
        return MAX_ROWS if mode == "on" else 0
    if torch.cuda.is_current_stream_capturing():
        warnings.warn("skinny-GEMM path off: first asked inside a CUDA graph capture, where it cannot be probed "
                      "(call CausalLM.new_cache or choose_skinny_rows before capturing)")
        return 0
    try:
        timer = GraphTimer(model)
        if mode == "on":
            for rows in (1, MAX_ROWS):  # compiles every variant now, or fails here rather than in a capture
                timer(True, rows)
            return MAX_ROWS
        key = (model.config, model.dtype, str(model.device))
        if key in _probed:
            limit, model.skinny_probe = _probed[key]
            return limit
        times = {}

        def timed(skinny: bool, rows: int) -> float:
            times[skinny, rows] = timer(skinny, rows)
            return times[skinny, rows]

        limit = choose(timed)
        model.skinny_probe = {rows: {"skinny_us": times[True, rows], "cublas_us": times[False, rows]}
                              for skinny, rows in times if skinny and (False, rows) in times}
        _probed[key] = limit, model.skinny_probe
        return limit
    except Exception as err:  # noqa: BLE001  any failure leaves today's path, which ran before this existed
        with contextlib.suppress(Exception):  # let a failed launch finish before the next one
            torch.cuda.synchronize()
        warnings.warn(f"skinny-GEMM path off: its probe failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})")
        return 0


def choose(time_forward: Callable[[bool, int], float], rows: tuple[int, ...] = PROBE_ROWS) -> int:
    """The largest of ``rows`` up to which ``time_forward(True, m) < time_forward(False, m)`` held at every
    count (times of the skinny path and of today's at m rows); 0 if it lost at the first."""
    limit = 0
    for m in rows:
        if time_forward(True, m) >= time_forward(False, m):
            break
        limit = m
    return limit


class GraphTimer:
    """``timer(skinny, rows)``: µs per decode forward of ``rows`` one-token rows by one path, as the median of a
    few CUDA-event timings of back-to-back graph replays. Writes only a small cache of its own."""

    def __init__(self, model, replays: int = 10, repeats: int = 3):
        c = model.config
        self.model, self.replays, self.repeats = model, replays, repeats
        self.cache = KVCache(c.num_layers, MAX_ROWS, 16, c.num_kv_heads, c.head_dim, dtype=model.dtype,
                             device=model.device)

    def __call__(self, skinny: bool, rows: int) -> float:
        model, device = self.model, self.model.device
        ids = torch.zeros((rows, 1), dtype=torch.long, device=device)
        positions = torch.zeros((rows, 1), dtype=torch.long, device=device)
        slots = torch.arange(rows, device=device)
        saved, model.skinny_rows = model.skinny_rows, rows if skinny else 0
        try:
            def forward():
                model(ids, positions, self.cache, slots, 1)

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(2):  # compiles (Triton), picks algorithms (cuBLAS): outside the graph
                    forward()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.no_grad():
                forward()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(self.repeats):
                start.record()
                for _ in range(self.replays):
                    graph.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3 / self.replays)
            return statistics.median(times)
        finally:
            model.skinny_rows = saved
