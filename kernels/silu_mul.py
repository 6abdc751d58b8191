"""SwiGLU's gate: out [M, I] = silu(gate) * up from the merged projection gate_up [M, 2I] (gate first).

silu runs in fp32 and is rounded to the model dtype before the product, as F.silu(gate) * up does."""
import triton
import triton.language as tl

from .pdl import wait_then_release


@triton.jit
def silu_mul_kernel(
    gate_up_ptr,  # [M, 2I] model dtype, rows contiguous
    out_ptr,  # [M, I] model dtype
    I,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (kernels/pdl.py)
):
    wait_then_release(PDL)
    row = tl.program_id(0).to(tl.int64)  # M x 2I passes 2**31 in long prefills of large models
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < I
    gate = tl.load(gate_up_ptr + row * 2 * I + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * I + I + cols, mask=ok, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * I + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=ok)
