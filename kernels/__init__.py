"""Triton kernels, one op per file (installed as ``rsd_engine.kernels``).

Without a CUDA device the kernels run under Triton's interpreter on CPU tensors (tests). Triton reads
``TRITON_INTERPRET`` when a ``@triton.jit`` function is defined, not when it is launched, so it is set
here, before any kernel module is imported. An explicit ``TRITON_INTERPRET`` in the environment wins.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
