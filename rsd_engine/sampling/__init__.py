"""One RSD-sample op, three backends: ``reference`` (PyTorch), ``cpp`` (csrc/, CPU) and ``triton``
(kernels/, CUDA, or CPU under ``TRITON_INTERPRET=1``). All take and return the same tensors; see
``reference.py`` for the contract."""
from __future__ import annotations

from .reference import (FLAG_REASONS, NO_ALLOWED_TOKEN, STUDENT_NONFINITE, TEACHER_NONFINITE, RowParams, SampleOutput,
                        rsd_sample_reference)

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
               backend: str = "reference") -> SampleOutput:
    if backend == "reference":
        return rsd_sample_reference(teacher_logits, student_logits, uniforms, params, proposal_mask, fallback_mask)
    if backend == "cpp":
        from .cpp import rsd_sample_cpp

        return rsd_sample_cpp(teacher_logits, student_logits, uniforms, params, proposal_mask, fallback_mask)
    if backend == "triton":
        from .triton import rsd_sample_triton

        return rsd_sample_triton(teacher_logits, student_logits, uniforms, params, proposal_mask, fallback_mask)
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


__all__ = ["BACKENDS", "FLAG_REASONS", "NO_ALLOWED_TOKEN", "RowParams", "SampleOutput", "STUDENT_NONFINITE",
           "TEACHER_NONFINITE", "resolve_backend", "rsd_sample", "rsd_sample_reference"]
