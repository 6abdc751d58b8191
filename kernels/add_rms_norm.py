"""Residual add fused with RMSNorm, one program per token row.

Inputs: residual [M, N] (updated in place when HAS_DELTA), delta [M, N], weight [N], all the model dtype,
rows contiguous. Output: out [M, N] = weight * rmsnorm(residual + delta).
Rounding as HF's decoder: the sum is rounded to the model dtype (it is the residual stream), the norm runs
in fp32 and is rounded to the model dtype before the weight scales it; weight x normed is exact in fp32 for
bf16/fp16 operands, so one final rounding gives HF's product.
"""
import triton
import triton.language as tl

from .pdl import wait_then_release


@triton.jit
def add_rms_norm_kernel(
    residual_ptr,  # [M, N] model dtype, in/out
    delta_ptr,  # [M, N] model dtype (unused without HAS_DELTA)
    weight_ptr,  # [N] model dtype
    out_ptr,  # [M, N] model dtype
    N, eps,
    HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (kernels/pdl.py)
):
    wait_then_release(PDL)
    row = tl.program_id(0).to(tl.int64)  # M x N may pass 2**31 in a long prefill
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(residual_ptr + row * N + cols, mask=ok, other=0.0)
    if HAS_DELTA:
        x = (x.to(tl.float32) + tl.load(delta_ptr + row * N + cols, mask=ok, other=0.0).to(tl.float32))
        x = x.to(residual_ptr.dtype.element_ty)
        tl.store(residual_ptr + row * N + cols, x, mask=ok)
    x = x.to(tl.float32)
    normed = x * tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    normed = normed.to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=ok)
