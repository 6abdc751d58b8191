"""A linear layer for a few token rows (decode steps, verification rounds), with the neighbouring op fused in.

Contract: out [M, N] = prologue(x) [M, K] @ W [N, K]^T (+ bias [N]), W an nn.Linear weight (row-major,
contiguous), all tensors the model dtype. The product accumulates in fp32 and is rounded once, with the bias,
to the model dtype (as cuBLAS's addmm). Prologues (constexpr), each with the rounding of the kernel it replaces:
- RMS_NORM: x [M, K] is the residual stream; the GEMM reads round(norm_w * round(rmsnorm(x))) as
  kernels/add_rms_norm.py (the sum of squares in fp32 over the whole row, in a pre-loop: x is tiny, in L2).
- SILU_MUL: x [M, 2K] is gate_up (gate first); the GEMM reads round(round(silu(gate)) * up) as kernels/silu_mul.py.
Epilogue ADD_RESIDUAL: residual [M, N] = round(residual + out), in place, instead of writing out (HF's
``x = x + o_proj(...)``); each program owns its N columns, so no two programs touch the same element.

At M <= 16 the layer is a stream of the weight: each program owns BLOCK_N output columns, walks K once in
BLOCK_K steps (every weight byte read once, no split-K, so the sum order is fixed and runs reproduce), and
keeps a [BLOCK_M, BLOCK_N] fp32 accumulator. The product is a tl.dot over BLOCK_M = 16 rows: the tensor
cores' spare work is free when the weight stream is the bound, and Triton software-pipelines a dot loop's
loads (num_stages deep), which keeps enough weight bytes in flight per SM. The prologue's math (an exp and a
division per element for SiLU) is not free: it runs on ROWS = next_pow2(M) rows only, tiled up to the dot's
16 (the copies' results are never stored), so one row costs a sixteenth of a full tile.
"""
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["M"])  # one compile serves every row count of a decode or verification step
def skinny_linear_kernel(
    x_ptr,  # [M, K] model dtype ([M, 2K] with SILU_MUL), rows contiguous
    weight_ptr,  # [N, K] model dtype, contiguous
    bias_ptr,  # [N] model dtype (unused without HAS_BIAS)
    norm_weight_ptr,  # [K] model dtype (unused without RMS_NORM)
    out_ptr,  # [M, N] model dtype: the output, or the residual stream updated in place with ADD_RESIDUAL
    M, N, K, eps,
    RMS_NORM: tl.constexpr, SILU_MUL: tl.constexpr, HAS_BIAS: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
    ROWS: tl.constexpr,  # next_pow2(M) up to BLOCK_M: the rows the prologue computes
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 operands (tests), else the tensor cores' "tf32" (unused)
    DOT_IN_FP32: tl.constexpr,  # the interpreter has no bf16 dot: operands upcast on CPU
):
    dtype = out_ptr.dtype.element_ty
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, ROWS)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    x_stride = 2 * K if SILU_MUL else K
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * x_stride  # [BLOCK_M, 1]
    w_rows = weight_ptr + cols.to(tl.int64)[:, None] * K  # [BLOCK_N, 1]
    ks = tl.arange(0, BLOCK_K)

    if RMS_NORM:
        squares = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_rows + k0 + ks[None, :], mask=row_ok[:, None] & (k0 + ks < K)[None, :], other=0.0)
            x = x.to(tl.float32)
            squares += x * x
        rstd = tl.rsqrt(tl.sum(squares, axis=1) / K + eps)  # [BLOCK_M]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        x_ok = row_ok[:, None] & k_ok[None, :]
        if SILU_MUL:
            gate = tl.load(x_rows + k0 + ks[None, :], mask=x_ok, other=0.0).to(tl.float32)
            up = tl.load(x_rows + K + k0 + ks[None, :], mask=x_ok, other=0.0).to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            x = (silu * up).to(dtype)
        else:
            x = tl.load(x_rows + k0 + ks[None, :], mask=x_ok, other=0.0)
        if RMS_NORM:
            g = tl.load(norm_weight_ptr + k0 + ks, mask=k_ok, other=0.0).to(tl.float32)
            normed = (x.to(tl.float32) * rstd[:, None]).to(dtype).to(tl.float32)
            x = (normed * g[None, :]).to(dtype)
        if ROWS < BLOCK_M:  # row r of the tile is x's row r % ROWS
            x = tl.reshape(tl.broadcast_to(x[None, :, :], (BLOCK_M // ROWS, ROWS, BLOCK_K)), (BLOCK_M, BLOCK_K))
        w = tl.load(w_rows + k0 + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        if DOT_IN_FP32:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = acc.to(dtype)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # the copies past ROWS (>= M) are masked off
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    ok = (rows < M)[:, None] & col_ok[None, :]
    if ADD_RESIDUAL:
        out = (tl.load(out_ptrs, mask=ok, other=0.0).to(tl.float32) + out.to(tl.float32)).to(dtype)
    tl.store(out_ptrs, out, mask=ok)
