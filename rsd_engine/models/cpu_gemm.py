"""Float32 linear layers on CPU through oneDNN's matmul, reading the model's own weights.

``F.linear`` on a float32 CPU tensor is MKL's SGEMM, which on AMD processors takes a generic code path:
on the two-core AMD EPYC (AVX-512) this project is developed on it reads a decoder's weights at 5-8 GB/s
for 2-32 rows, where oneDNN's matmul over the same plain [out, in] tensor reads them at 12-22 GB/s, and it
is 1.2-1.5x faster at 256-2,048 rows too (bench/bench_e2e.py --cpu-gemms compares the two end to end).
The weights stay as they are: nothing is copied or re-laid out, so a model costs no more memory.

RSD_CPU_GEMM=blas takes ``F.linear``, torch's own BLAS (MKL in x86-64 builds), again: for comparisons, or a
machine where it is faster. oneDNN is the default on x86-64 processors only, where it was measured; elsewhere
(ARM builds, whose BLAS is another library) ``blas`` is. Other dtypes, other devices, autograd and code that
torch.compile traces, CPU autocast and a strided bias keep ``F.linear``.
"""
from __future__ import annotations

import functools
import os
import platform

import torch
import torch.nn.functional as F
from torch import nn

ENV = "RSD_CPU_GEMM"
CHOICES = ("onednn", "blas")
DEFAULT = "onednn" if platform.machine().lower() in ("x86_64", "amd64") else "blas"
# oneDNN costs about 25 µs a call whatever the size (its primitive lookup): below about 1 MB of weights
# (a 288 x 96 matrix: 7 µs in BLAS, 30 in oneDNN; 1,024 x 256: 33 and 27) BLAS is the faster.
MIN_WEIGHT_ELEMENTS = 1 << 18


@functools.lru_cache(maxsize=None)
def _onednn(choice: str) -> bool:
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r} is not a CPU GEMM choice: use one of {', '.join(CHOICES)}")
    return (choice == "onednn" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def choice() -> str:
    """RSD_CPU_GEMM as given (any case; unset or empty: DEFAULT), refused if it names no choice."""
    value = os.environ.get(ENV, "").strip().lower() or DEFAULT
    _onednn(value)
    return value


def uses_onednn() -> bool:
    """Whether float32 CPU linears of MIN_WEIGHT_ELEMENTS or more take oneDNN now (where torch has it)."""
    return _onednn(choice())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; on float32 CPU tensors through oneDNN (see the module's note). oneDNN reads
    the bias as contiguous whatever its strides: a strided bias keeps F.linear."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.numel() >= MIN_WEIGHT_ELEMENTS and (bias is None or bias.is_contiguous())
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and uses_onednn()):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (the same parameters and checkpoint names) whose product is ``linear`` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
