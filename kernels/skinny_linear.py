"""A linear layer for a few token rows (decode steps, verification rounds), with the neighbouring op fused in.

Contract: out [M, N] = prologue(x) [M, K] @ W [N, K]^T (+ bias [N]), W an nn.Linear weight (row-major,
contiguous), all tensors the model dtype. The product accumulates in fp32 and is rounded once, with the bias,
to the model dtype (as cuBLAS's addmm). Prologues (constexpr), each with the rounding of the kernel it replaces:
- RMS_NORM: x [M, K] is the residual stream; the GEMM reads round(norm_w * round(rmsnorm(x))) as
  kernels/add_rms_norm.py (the sum of squares in fp32 over the whole row, in a pre-loop: x is tiny, in L2).
- SILU_MUL: x [M, 2K] is gate_up (gate first); the GEMM reads round(round(silu(gate)) * up) as kernels/silu_mul.py.
Epilogue ADD_RESIDUAL: residual [M, N] = round(residual + out), in place, instead of writing out (HF's
``x = x + o_proj(...)``); each program owns its N columns, so no two programs touch the same element.

At M <= 16 the layer is a stream of the weight: each program owns BLOCK_N output columns and walks K once in
BLOCK_K steps, STAGES tiles in flight (software-pipelined), every weight byte read once; no split-K, so the
sum order is fixed and runs reproduce. Two forms of the product, by ROWS = next_pow2(M) (constexpr):
- ROWS = 1 (a decode step at batch 1): fp32 FMAs into a [BLOCK_N, BLOCK_K] accumulator, summed over K once
  at the end. No dot means no 16-row minimum: BLOCK_N can be 4, so even a 1024-column weight spreads over
  256 programs.
- ROWS > 1: a tl.dot over BLOCK_M = 16 rows (the tensor cores' spare work is free while the weight stream
  is the bound). The prologue's math (an exp and a division per element for SiLU) is not free: it runs on
  the ROWS rows only, tiled up to the dot's 16 (the copies' results are never stored).
"""
import triton
import triton.language as tl

from .pdl import wait_then_release


@triton.jit(do_not_specialize=["M"])  # one compile serves every row count of a decode or verification step
def skinny_linear_kernel(
    x_ptr,  # [M, K] model dtype ([M, 2K] with SILU_MUL), rows contiguous
    weight_ptr,  # [N, K] model dtype, contiguous
    bias_ptr,  # [N] model dtype (unused without HAS_BIAS)
    norm_weight_ptr,  # [K] model dtype (unused without RMS_NORM)
    out_ptr,  # [M, N] model dtype: the output, or the residual stream updated in place with ADD_RESIDUAL
    M, N, K, eps,
    RMS_NORM: tl.constexpr, SILU_MUL: tl.constexpr, HAS_BIAS: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
    ROWS: tl.constexpr,  # next_pow2(M) up to BLOCK_M: the rows the prologue computes; 1 takes the FMA form
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 operands (tests), else the tensor cores' "tf32" (unused)
    DOT_IN_FP32: tl.constexpr,  # the interpreter has no bf16 dot: operands upcast on CPU
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (kernels/pdl.py)
):
    wait_then_release(PDL)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, ROWS)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * (2 * K if SILU_MUL else K)  # [ROWS, 1]
    w_rows = weight_ptr + cols.to(tl.int64)[:, None] * K  # [BLOCK_N, 1]
    ks = tl.arange(0, BLOCK_K)

    rstd = tl.zeros((ROWS,), dtype=tl.float32)
    if RMS_NORM:
        squares = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_rows + k0 + ks[None, :], mask=(rows < M)[:, None] & (k0 + ks < K)[None, :], other=0.0)
            x = x.to(tl.float32)
            squares += x * x
        rstd = tl.rsqrt(tl.sum(squares, axis=1) / K + eps)

    if ROWS == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            x = _gemm_input(x_rows, norm_weight_ptr, rstd, rows < M, k0 + ks, K, RMS_NORM, SILU_MUL,
                            out_ptr.dtype.element_ty)  # [1, BLOCK_K]
            w = tl.load(w_rows + k0 + ks[None, :], mask=(cols < N)[:, None] & (k0 + ks < K)[None, :], other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)
        _epilogue(tl.sum(acc, axis=1)[None, :], rows, cols, bias_ptr, out_ptr, M, N, HAS_BIAS, ADD_RESIDUAL)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            x = _gemm_input(x_rows, norm_weight_ptr, rstd, rows < M, k0 + ks, K, RMS_NORM, SILU_MUL,
                            out_ptr.dtype.element_ty)  # [ROWS, BLOCK_K]
            if ROWS < BLOCK_M:  # row r of the tile is x's row r % ROWS
                x = tl.reshape(tl.broadcast_to(x[None, :, :], (BLOCK_M // ROWS, ROWS, BLOCK_K)), (BLOCK_M, BLOCK_K))
            w = tl.load(w_rows + k0 + ks[None, :], mask=(cols < N)[:, None] & (k0 + ks < K)[None, :], other=0.0)
            if DOT_IN_FP32:
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        # The copies past ROWS (rows >= M) are masked off at the store.
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        _epilogue(acc, rows, cols, bias_ptr, out_ptr, M, N, HAS_BIAS, ADD_RESIDUAL)


@triton.jit
def _gemm_input(x_rows, norm_weight_ptr, rstd, row_ok, ks, K, RMS_NORM: tl.constexpr, SILU_MUL: tl.constexpr,
                dtype: tl.constexpr):
    """prologue(x)[rows, ks] in the model dtype (0 outside the matrix)."""
    ok = row_ok[:, None] & (ks < K)[None, :]
    if SILU_MUL:
        gate = tl.load(x_rows + ks[None, :], mask=ok, other=0.0).to(tl.float32)
        up = tl.load(x_rows + K + ks[None, :], mask=ok, other=0.0).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        x = (silu * up).to(dtype)
    else:
        x = tl.load(x_rows + ks[None, :], mask=ok, other=0.0)
    if RMS_NORM:
        g = tl.load(norm_weight_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
        normed = (x.to(tl.float32) * rstd[:, None]).to(dtype).to(tl.float32)
        x = (normed * g[None, :]).to(dtype)
    return x


@triton.jit
def _epilogue(acc, rows, cols, bias_ptr, out_ptr, M, N, HAS_BIAS: tl.constexpr, ADD_RESIDUAL: tl.constexpr):
    """acc [R, BLOCK_N] fp32 (+ bias), rounded, stored at out[rows, cols] or added to it in place."""
    dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out = acc.to(dtype)
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    if ADD_RESIDUAL:
        out = (tl.load(ptrs, mask=ok, other=0.0).to(tl.float32) + out.to(tl.float32)).to(dtype)
    tl.store(ptrs, out, mask=ok)
