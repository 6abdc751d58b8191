"""The decode step's inputs, kept on the device between steps.

A decode step is one function of a dict of batch-major tensors (``STEP_INPUTS``): static shapes, no
host syncs, so it compiles with ``fullgraph=True`` on CPU and is captured as a CUDA graph on GPU
(cuda_graph.py). Its inputs live in ``StepState``, which the step itself moves on; the host patches
rows only when the batch changes. The trap is padding: captured graphs run at bucket sizes, and rows
past the real batch must decode a dummy token into the scratch slot with harmless parameters
(``PADDING_PARAMS``) and stay where they are.
"""
from __future__ import annotations

import functools
import struct
from contextlib import contextmanager

import torch

from .sampling import RowParams

STEP_INPUTS = {
    "teacher_tokens": torch.long, "teacher_pos": torch.long, "student_tokens": torch.long,
    "student_pos": torch.long, "slots": torch.long, "seeds": torch.long, "steps": torch.long,
    "temperature": torch.float32, "top_k": torch.int32, "top_p": torch.float32, "threshold": torch.float32,
    "check_temperature": torch.float32, "student_temperature": torch.float32, "student_top_k": torch.int32,
    "student_top_p": torch.float32, "proposal_trials": torch.int32,
}
PADDING_PARAMS = {"temperature": 1.0, "top_p": 1.0, "check_temperature": 1.0, "student_temperature": 1.0,
                  "student_top_p": 1.0, "proposal_trials": 1}
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def step_inputs(batch, device, *, with_slots: bool) -> dict[str, torch.Tensor]:
    """The decode step's inputs, one row per request: tokens, positions, slots, randomness, parameters."""
    params = [r.params for r in batch]
    values = {
        "teacher_tokens": [r.next_teacher_token for r in batch],
        "teacher_pos": [r.teacher_len for r in batch],
        "student_tokens": [r.next_student_token for r in batch],
        "student_pos": [r.student_len for r in batch],
        "slots": [r.slot for r in batch],
        "seeds": [r.seed for r in batch],
        "steps": [len(r.result.token_ids) for r in batch],
        **{name: [getattr(p, name) for p in params] for name in RowParams._fields},
    }
    if not with_slots:
        del values["slots"]
    return {name: torch.tensor(v, dtype=STEP_INPUTS[name]).to(device, non_blocking=True)
            for name, v in values.items()}


def pack_outputs(columns, out: torch.Tensor | None = None) -> torch.Tensor:
    """The step's outputs ``[n]`` or ``[n, k]`` each, side by side as one float64 ``[n, C]`` (exact for int64
    tokens below 2**53 and float32 log-probs), read back with one copy. Given ``out`` (StepState.out, a
    captured graph's static buffer), each column is cast straight into it: one kernel per column instead of
    a cast each, a concatenation and a copy."""
    columns = [c.reshape(c.shape[0], -1) for c in columns]
    if out is None:
        return torch.cat([c.double() for c in columns], dim=1)
    start = 0
    for c in columns:
        out[:, start:start + c.shape[1]].copy_(c)
        start += c.shape[1]
    if start != out.shape[1]:
        raise ValueError(f"the step's outputs are {start} columns, its output buffer {out.shape[1]}")
    return out


def advance_and_pack(inputs: dict[str, torch.Tensor], sampled, teacher_next: torch.Tensor,
                     teacher_advance: torch.Tensor, scratch_slot: int, out: torch.Tensor) -> torch.Tensor:
    """Engine._advance and pack_outputs of one plain step in one launch (kernels/advance.py): the rows move
    on in place and ``out`` [B, 4] receives (token, accepted, teacher and student log-probs)."""
    from torch._subclasses.fake_tensor import FakeTensor

    n = sampled.token.shape[0]
    if out.shape != (n, 4):
        raise ValueError(f"the step's output buffer is {tuple(out.shape)}, not [{n}, 4]")
    if n == 0 or isinstance(out, FakeTensor):
        return out  # traced under FakeTensorMode: the shapes are all a trace needs
    accepted = sampled.accepted
    accepted = accepted.view(torch.int8) if accepted.dtype == torch.bool else accepted.to(torch.int8)
    slots = inputs.get("slots")
    block = 128
    _advance_kernel()[(-(-n // block),)](
        sampled.token, accepted, sampled.teacher_logprob, sampled.student_logprob, inputs["student_tokens"],
        inputs["teacher_tokens"], inputs["student_pos"], inputs["teacher_pos"], inputs["steps"],
        slots if slots is not None else sampled.token, teacher_next, teacher_advance, out, n, out.stride(0),
        scratch_slot, HAS_SLOTS=slots is not None, BLOCK=block, num_warps=4)
    return out


def round_advance_and_pack(inputs: dict[str, torch.Tensor], verified, mapped: torch.Tensor,
                           teacher_next: torch.Tensor, teacher_advance: torch.Tensor, scratch_slot: int,
                           max_seq_len: int, draft_tokens: int, out: torch.Tensor) -> torch.Tensor:
    """SpeculativeDecoder._advance and pack_outputs of one round in one launch (kernels/advance.py): the rows
    move on and size their next num_draft in place, and ``out`` [B, 1 + 4W] receives (num_emitted, tokens,
    accepted, teacher and student log-probs)."""
    from torch._subclasses.fake_tensor import FakeTensor

    n, width = verified.tokens.shape
    if out.shape != (n, 1 + 4 * width):
        raise ValueError(f"the round's output buffer is {tuple(out.shape)}, not [{n}, {1 + 4 * width}]")
    if n == 0 or isinstance(out, FakeTensor):
        return out
    accepted = verified.accepted.contiguous()
    accepted = accepted.view(torch.int8) if accepted.dtype == torch.bool else accepted.to(torch.int8)
    slots = inputs.get("slots")
    block = 64
    kernel = _kernels().round_advance_pack_kernel
    from triton import next_power_of_2  # here, as the kernels: CPU-only users never load Triton

    kernel[(-(-n // block),)](
        verified.num_emitted, verified.tokens.contiguous(), accepted, verified.teacher_logprob.contiguous(),
        verified.student_logprob.contiguous(), mapped.view(torch.int8), inputs["student_tokens"],
        inputs["teacher_tokens"], inputs["student_pos"], inputs["teacher_pos"], inputs["steps"],
        inputs["num_draft"], inputs["max_new_tokens"], slots if slots is not None else inputs["steps"],
        teacher_next, teacher_advance, out, n, out.stride(0), scratch_slot, max_seq_len, draft_tokens,
        W=width, WP2=next_power_of_2(width), HAS_SLOTS=slots is not None, BLOCK=block, num_warps=4)
    return out


@functools.cache
def _kernels():
    from .sampling.triton import import_kernel  # not at import time: CPU-only users never load Triton

    return import_kernel("advance")


def _advance_kernel():
    return _kernels().advance_pack_kernel


def row_values(r) -> dict[str, int | float]:
    """One request's row of step inputs, as the host knows it between steps."""
    p = r.params
    return {"teacher_tokens": r.next_teacher_token, "teacher_pos": r.teacher_len,
            "student_tokens": r.next_student_token, "student_pos": r.student_len, "slots": r.slot,
            "seeds": r.seed, "steps": len(r.result.token_ids),
            **{name: getattr(p, name) for name in RowParams._fields}}


class StepState:
    """The decode step's inputs, resident on the device: row b belongs to ``batch[b]`` (DESIGN.md §10,
    "a graph that feeds itself").

    The step moves its own rows on after sampling (tokens, positions, step counters: Engine._advance,
    SpeculativeDecoder._advance), so from one step to the next the host sends nothing. It patches rows only where the batch
    changed, with one upload: an int64 ``[1 + F, n]`` block whose first line says, for every row, which
    row of the previous step it continues (``-1``: a request that just joined, whose F values follow;
    floats travel as their float32 bits). The block is applied on the device by a gather and a select,
    and rows past the batch are reset to padding. The step's outputs, packed into one float64 ``[n, C]``
    tensor (exact for int64 tokens below 2**53 and float32 log-probs), come back with one copy: on CUDA
    an asynchronous copy into pinned memory and an event that the host waits on, on CPU the tensor's
    ``tolist``.

    The trap: ``sync`` assumes that every row it carries over holds exactly what the host would upload for
    it, i.e. that the device's advance mirrors the host's commit. A row the host changes otherwise must be sent as
    new (``dirty``).
    """

    def __init__(self, fields: dict[str, torch.dtype], rows: int, device, padding: dict[str, int | float],
                 out_columns: int, values=row_values):
        self.device = torch.device(device)
        self.values = values  # request -> its row of fields, for rows that join
        self.rows = rows
        # Fields grouped by dtype: one buffer per dtype, one line per field; the patch follows that order.
        self.names = sorted(fields, key=lambda name: str(fields[name]))
        self.groups: dict[torch.dtype, tuple[int, int]] = {}
        for i, name in enumerate(self.names):
            start, _ = self.groups.get(fields[name], (i, i))
            self.groups[fields[name]] = (start, i + 1)
        self.padding = [padding.get(name, 0) for name in self.names]
        pad = {dtype: torch.tensor(self.padding[a:b], dtype=dtype, device=self.device)[:, None]
               for dtype, (a, b) in self.groups.items()}
        self._pad = pad
        self.buffers = {dtype: pad[dtype].expand(-1, rows).clone() for dtype in self.groups}
        self.views = {name: self.buffers[fields[name]][i - self.groups[fields[name]][0]]
                      for i, name in enumerate(self.names)}
        self._is_float = [fields[name].is_floating_point for name in self.names]
        # An int32 field's value as the kernels read it: clamped to int32's range, which keeps its meaning (a top_k
        # past V: every id), where the device's cast wraps (2**32 + 1 became 1: greedy); checks.as_int32.
        self._int_range = [(-2**31, 2**31 - 1) if fields[name] == torch.int32 else None for name in self.names]
        self.requests: list = []  # what each row holds, as of the last sync
        self.dirty: set[int] = set()  # id() of requests the host changed outside the device's advance
        self.out = torch.zeros(rows, out_columns, dtype=torch.float64, device=self.device)
        if self.device.type == "cuda":
            # Two of each: with the engine's pipelining (engine.py, _decode) one read is in flight while the
            # next step starts; a buffer is reused two steps later, after the host waited for its step.
            self.host_out = [torch.empty(rows, out_columns, dtype=torch.float64, pin_memory=True) for _ in "ab"]
            self.read_done = [torch.cuda.Event() for _ in "ab"]
            self.staging = [torch.empty((1 + len(self.names)) * rows, dtype=torch.int64, pin_memory=True)
                            for _ in "ab"]
            self._reads = self._patches = 0

    @contextmanager
    def padded(self):
        """Every row padding inside the block (graph warm-up runs the step), the real rows back after it."""
        saved = {dtype: buffer.clone() for dtype, buffer in self.buffers.items()}
        for dtype, buffer in self.buffers.items():
            buffer.copy_(self._pad[dtype].expand_as(buffer))
        try:
            yield
        finally:
            for dtype, buffer in self.buffers.items():
                buffer.copy_(saved[dtype])

    def inputs(self, n: int, *, with_slots: bool = True) -> dict[str, torch.Tensor]:
        """Views of the first ``n`` rows, named as the step reads them (static buffers: a graph reads these)."""
        return {name: view[:n] for name, view in self.views.items() if with_slots or name != "slots"}

    def sync(self, batch) -> bool:
        """Make rows 0..len(batch)-1 hold ``batch``; returns whether anything was sent."""
        if len(batch) > self.rows:
            raise ValueError(f"batch of {len(batch)} rows exceeds the step state's {self.rows} rows")
        old = {id(r): b for b, r in enumerate(self.requests) if id(r) not in self.dirty}
        source = [old.get(id(r), -1) for r in batch]
        self.dirty.clear()
        n, fields = len(batch), len(self.names)
        if source == list(range(n)):  # the same rows, or fewer from the end: nothing to send
            if n < len(self.requests):
                for dtype, buffer in self.buffers.items():
                    buffer[:, n:] = self._pad[dtype]
                self.requests = list(batch)
            return False
        block = [0] * ((1 + fields) * n)
        block[:n] = source
        for b, r in enumerate(batch):
            if source[b] >= 0:
                continue
            row = self.values(r)
            for f, name in enumerate(self.names):
                if self._is_float[f]:
                    block[(1 + f) * n + b] = _float32_bits(row[name])
                else:
                    value, bounds = int(row[name]), self._int_range[f]
                    block[(1 + f) * n + b] = value if bounds is None else min(max(value, bounds[0]), bounds[1])
        patch = torch.tensor(block, dtype=torch.int64)  # the one upload
        if self.device.type == "cuda":
            staged = self.staging[self._patches % 2][: patch.numel()]
            self._patches += 1
            staged.copy_(patch)
            patch = staged.to(self.device, non_blocking=True)
        self._apply(patch.view(1 + fields, n), n)
        self.requests = list(batch)
        return True

    def _apply(self, patch: torch.Tensor, n: int):
        source = patch[0]
        carried = source >= 0
        rows = source.clamp_min(0)
        for dtype, (a, b) in self.groups.items():
            buffer = self.buffers[dtype]
            fresh = patch[1 + a: 1 + b]
            fresh = fresh.to(torch.int32).view(dtype) if dtype.is_floating_point else fresh.to(dtype)
            buffer[:, :n] = torch.where(carried, buffer.index_select(1, rows), fresh)
            buffer[:, n:] = self._pad[dtype]

    def read(self, packed: torch.Tensor) -> list[list[float]]:
        """The step's packed outputs ``[n, C]`` as Python rows: the step's one host read."""
        return self.start_read(packed)()

    def start_read(self, packed: torch.Tensor):
        """Start bringing the packed outputs ``[n, C]`` to the host (one asynchronous copy on CUDA); returns a
        function that waits for them and gives them as Python rows."""
        if self.device.type != "cuda":
            return packed.tolist
        turn, self._reads = self._reads % 2, self._reads + 1
        host, done = self.host_out[turn][: packed.shape[0]], self.read_done[turn]
        host.copy_(packed, non_blocking=True)
        done.record()

        def rows():
            done.synchronize()
            return host.tolist()
        return rows


def _float32_bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", x))[0]

