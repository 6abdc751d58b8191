"""The sampling ops, three backends each: ``reference`` (PyTorch), ``cpp`` (csrc/, CPU) and ``triton``
(kernels/, CUDA, or CPU under ``TRITON_INTERPRET=1``). All backends of an op take and return the same
tensors. ``rsd_sample``: one RSD step (contract in reference.py). ``sample_tokens``: one model's
truncated sampling (sample_reference.py). ``rsd_verify``: the verify step of a speculative round
(verify_reference.py)."""
from __future__ import annotations

from .checks import check_rsd_sample_inputs, check_sample_inputs, check_verify_inputs
from .reference import (FLAG_REASONS, NO_ALLOWED_TOKEN, STUDENT_NONFINITE, TEACHER_NONFINITE, RowParams, SampleOutput,
                        rsd_sample_reference)
from .sample_reference import SAMPLE_FLAGGED, sample_tokens_reference
from .verify_reference import VerifyOutput, rsd_verify_reference

BACKENDS = ("reference", "cpp", "triton")


def resolve_backend(sampler: str, device) -> str:
    """Map ``"auto"`` to the fused backend for ``device``; check that an explicit choice can run."""
    import torch

    device = torch.device(device)
    if sampler == "auto":
        if device.type == "cuda" and _triton_available():
            return "triton"
        if device.type == "cpu" and _cpp_available():
            return "cpp"
        return "reference"
    if sampler not in BACKENDS:
        raise ValueError(f"sampler={sampler!r} is not a backend: choose one of 'auto', {', '.join(map(repr, BACKENDS))}")
    if sampler == "cpp" and (device.type != "cpu" or not _cpp_available()):
        raise ValueError("sampler='cpp' needs device='cpu' and the compiled extension rsd_engine._C "
                         "(reinstall with `pip install -e .` to build it)")
    if sampler == "triton" and not _triton_available():
        raise ValueError("sampler='triton' needs the triton package (`pip install triton`)")
    return sampler


def rsd_sample(teacher_logits, student_logits, uniforms, params: RowParams, proposal_mask, fallback_mask,
               backend: str = "reference", *, check_values: bool = True) -> SampleOutput:
    """One RSD step; see reference.py. Every backend checks its inputs with checks.py (the reference here):
    shapes always, values where they can be read without a host sync. ``check_values=False`` skips the values,
    for callers whose rows SamplingParams checked and whose step must not read back (the engine)."""
    args = (teacher_logits, student_logits, uniforms, params, proposal_mask, fallback_mask)
    if backend == "reference":
        check_rsd_sample_inputs(*args, values=check_values)
        params = RowParams(*(p.to(teacher_logits.device) for p in params))  # rows may arrive on the CPU
        return rsd_sample_reference(teacher_logits, student_logits, uniforms, params, proposal_mask, fallback_mask)
    if backend == "cpp":
        from .cpp import rsd_sample_cpp

        return rsd_sample_cpp(*args, check_values=check_values)
    if backend == "triton":
        from .triton import rsd_sample_triton

        return rsd_sample_triton(*args, check_values=check_values)
    raise ValueError(f"unknown sampler backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def sample_tokens(logits, uniforms, temperature, top_k, top_p, mask, backend: str = "reference", *,
                  check_values: bool = True):
    """token [B] int64 ~ truncate(softmax(logits / temperature) on mask, top_k, top_p), one uniform per row.
    Inputs are checked once (check_sample_inputs): here for the reference, by the cpp and Triton ops themselves;
    ``check_values`` as for ``rsd_sample``."""
    args = (logits, uniforms, temperature, top_k, top_p, mask)
    if backend == "reference":
        check_sample_inputs(*args, values=check_values)
        return sample_tokens_reference(*args)
    if backend == "cpp":
        from .cpp_verify import sample_tokens_cpp

        return sample_tokens_cpp(*args, check_values=check_values)
    if backend == "triton":
        from .triton_verify import sample_tokens_triton

        return sample_tokens_triton(*args, check_values=check_values)
    raise ValueError(f"unknown sampler backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def rsd_verify(teacher_logits, student_logits, draft, num_draft, uniforms, params: RowParams, proposal_mask,
               fallback_mask, backend: str = "reference", *, check_values: bool = True) -> VerifyOutput:
    """Verifies a speculative round of G drafts against the RSD law; see verify_reference.py. ``check_values``
    as for ``rsd_sample``."""
    args = (teacher_logits, student_logits, draft, num_draft, uniforms, params, proposal_mask, fallback_mask)
    if backend == "reference":  # the cpp and Triton ops check their inputs themselves
        check_verify_inputs(*args, values=check_values)
        return rsd_verify_reference(*args)
    if backend == "cpp":
        from .cpp_verify import rsd_verify_cpp

        return rsd_verify_cpp(*args, check_values=check_values)
    if backend == "triton":
        from .triton_verify import rsd_verify_triton

        return rsd_verify_triton(*args, check_values=check_values)
    raise ValueError(f"unknown sampler backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def _cpp_available() -> bool:
    try:
        from .. import _C  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["BACKENDS", "FLAG_REASONS", "NO_ALLOWED_TOKEN", "RowParams", "SAMPLE_FLAGGED", "SampleOutput",
           "STUDENT_NONFINITE", "TEACHER_NONFINITE", "VerifyOutput", "resolve_backend", "rsd_sample",
           "rsd_sample_reference", "rsd_verify", "rsd_verify_reference", "sample_tokens", "sample_tokens_reference"]
