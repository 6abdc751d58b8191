"""The decode step's inputs and its CUDA-graph capture.

A decode step is one function of a dict of batch-major tensors (``STEP_INPUTS``): static shapes, no
host syncs, so it compiles with ``fullgraph=True`` on CPU and is captured as a CUDA graph on GPU.
The trap is padding: captured graphs run at bucket sizes, and rows past the real batch must decode
a dummy token into the scratch slot with harmless parameters (``PADDING_PARAMS``).
"""
from __future__ import annotations

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


def capture_step(step, *, max_batch_size: int, scratch_slot: int, device, inputs=STEP_INPUTS):
    """A CudaGraphStep over ``step(inputs)`` for batch buckets up to ``max_batch_size``; ``inputs`` names
    the step's input tensors and their dtypes."""
    from .cuda_graph import CudaGraphStep

    padding = {"slots": scratch_slot, **PADDING_PARAMS}
    n = max_batch_size
    example = {name: torch.full((n,), padding.get(name, 0), dtype=dtype, device=device)
               for name, dtype in inputs.items()}
    buckets = sorted({b for b in GRAPH_BUCKETS if b < n} | {n})
    return CudaGraphStep(step, example, buckets=buckets, padding=padding)
