"""The fused C++ RSD sampler (csrc/rsd_sample.cpp) behind the reference's signature.

It is registered as the torch custom op ``rsd_engine::rsd_sample_cpp`` with a fake (shape-only)
implementation, so a decode step that calls it compiles with ``torch.compile(fullgraph=True)`` on CPU:
the op is one opaque node, no graph break, no host sync. Inputs are checked here, at the boundary,
because the kernel only sees raw pointers.
"""
from __future__ import annotations

import torch

from .checks import as_int32, check_rsd_sample_inputs
from .reference import RowParams, SampleOutput

LOGIT_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_INT_PARAMS = frozenset({"top_k", "student_top_k", "proposal_trials"})


def rsd_sample_cpp(teacher_logits, student_logits, uniforms, params: RowParams, proposal_mask, fallback_mask, *,
                   check_values: bool = True) -> SampleOutput:
    """Same arguments and result as ``rsd_sample_reference``; logits float32, bfloat16 or float16 on CPU."""
    check_rsd_sample_inputs(teacher_logits, student_logits, uniforms, params, proposal_mask, fallback_mask,
                            values=check_values)  # the kernel reads raw pointers
    _check_cpu(teacher_logits=teacher_logits)  # the checks put every other tensor on its device or the CPU
    if proposal_mask.numel() >= 2**31:
        raise ValueError(f"V={proposal_mask.numel()} ids is beyond what the cpp sampler indexes (< 2**31)")
    row = [(as_int32(getattr(params, name)) if name in _INT_PARAMS else getattr(params, name).to(torch.float32))
           .contiguous() for name in RowParams._fields]
    out = rsd_sample_op(teacher_logits, student_logits, uniforms.contiguous(), *row, proposal_mask.contiguous(),
                        fallback_mask.contiguous())
    return SampleOutput(*out)


@torch.library.custom_op("rsd_engine::rsd_sample_cpp", mutates_args=(), device_types="cpu")
def rsd_sample_op(teacher_logits: torch.Tensor, student_logits: torch.Tensor, uniforms: torch.Tensor,
                  temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, threshold: torch.Tensor,
                  check_temperature: torch.Tensor, student_temperature: torch.Tensor, student_top_k: torch.Tensor,
                  student_top_p: torch.Tensor, proposal_trials: torch.Tensor, proposal_mask: torch.Tensor,
                  fallback_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op itself; call it through ``rsd_sample_cpp``, which checks the inputs and converts the parameters
    to the dtypes the kernel reads (float32, and int32 for top_k, student_top_k, proposal_trials)."""
    _C = extension()
    # The kernel needs unit stride along the vocabulary and contiguous [B] parameters; other layouts (any
    # the caller passes, or a compiled graph hands over) are copied, as the other backends do.
    teacher_logits, student_logits, uniforms = (_unit_last_stride(t) for t in (teacher_logits, student_logits,
                                                                                uniforms))
    row = [p.contiguous() for p in (temperature, top_k, top_p, threshold, check_temperature, student_temperature,
                                    student_top_k, student_top_p, proposal_trials)]
    proposal_mask, fallback_mask = proposal_mask.contiguous(), fallback_mask.contiguous()
    B = teacher_logits.shape[0]
    token = torch.empty(B, dtype=torch.int64)
    accepted = torch.empty(B, dtype=torch.bool)
    teacher_logprob = torch.empty(B, dtype=torch.float32)
    student_logprob = torch.empty(B, dtype=torch.float32)
    _C.rsd_sample(
        B,
        teacher_logits.data_ptr(), teacher_logits.stride(0), teacher_logits.shape[1],
        LOGIT_DTYPES[teacher_logits.dtype],
        student_logits.data_ptr(), student_logits.stride(0), student_logits.shape[1],
        LOGIT_DTYPES[student_logits.dtype],
        uniforms.data_ptr(), uniforms.stride(0), uniforms.shape[1],
        *(p.data_ptr() for p in row),
        proposal_mask.data_ptr(), fallback_mask.data_ptr(), proposal_mask.numel(),
        token.data_ptr(), accepted.data_ptr(), teacher_logprob.data_ptr(), student_logprob.data_ptr(),
        torch.get_num_threads(),
    )
    return token, accepted, teacher_logprob, student_logprob


@rsd_sample_op.register_fake
def _(teacher_logits, student_logits, uniforms, *rest):
    B = teacher_logits.shape[0]
    return (teacher_logits.new_empty(B, dtype=torch.int64), teacher_logits.new_empty(B, dtype=torch.bool),
            teacher_logits.new_empty(B, dtype=torch.float32), teacher_logits.new_empty(B, dtype=torch.float32))


def extension():
    """The compiled kernel module, or an ImportError that says how to build it."""
    try:
        from .. import _C
    except ImportError as err:
        raise ImportError("the cpp sampler needs the compiled extension rsd_engine._C: build it with "
                          "`pip install -e . --no-build-isolation` or `python setup.py build_ext --inplace`") from err
    return _C


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _check_cpu(**tensors):
    for name, t in tensors.items():
        if t.device.type != "cpu":
            raise ValueError(f"{name} is on {t.device}; the cpp backend runs on CPU (use backend='triton' on CUDA)")
