"""Where the Triton backend's tensors live in the tests: on CUDA wherever a device exists (the kernels are
compiled there and refuse CPU tensors), else on CPU under TRITON_INTERPRET=1 (set by conftest.py).

Tests build their inputs on CPU and compare on CPU, whatever the backend; ``on_triton_device(op)`` wraps a
sampling op so that a ``backend="triton"`` call sends its tensors to TRITON_DEVICE and brings the outputs
back. Other backends, and every call on a machine without CUDA, go through untouched.
"""
from __future__ import annotations

import functools

import torch

TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_device(value, device):
    """``value`` with every tensor in it (also inside tuples, NamedTuples, lists and dicts) on ``device``;
    strides of dense tensors are kept (Tensor.to preserves them), so stride tests keep their meaning."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        items = [to_device(v, device) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def on_triton_device(op):
    """``op(*args, backend=..., **kwargs)`` that runs its Triton calls on TRITON_DEVICE, outputs on CPU."""
    @functools.wraps(op)
    def call(*args, backend="reference", **kwargs):
        if backend != "triton" or TRITON_DEVICE.type == "cpu":
            return op(*args, backend=backend, **kwargs)
        out = op(*to_device(args, TRITON_DEVICE), backend=backend, **to_device(kwargs, TRITON_DEVICE))
        return to_device(out, "cpu")

    return call


def engine_placement(sampler: str) -> dict:
    """Engine/Generator keyword arguments for a test of ``sampler`` against CPU engines: Triton runs on
    TRITON_DEVICE, in float32 like the CPU engines it is compared with; the other samplers run on CPU."""
    if sampler == "triton":
        return dict(device=str(TRITON_DEVICE), dtype="float32")
    return dict(device="cpu")
