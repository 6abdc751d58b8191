"""Launchers of the decoder's Triton kernels (kernels/): the CUDA path of transformer.py.

On CUDA they run compiled; on CPU tensors under Triton's interpreter (tests). None syncs with the host,
so a forward made of them and cuBLAS GEMMs is CUDA-graph capturable. Every launch goes through ``_launch``
(tests/test_kernel_count.py counts the CUDA path's kernels per layer there).
"""
from __future__ import annotations

import functools

import torch
from torch._subclasses.fake_tensor import FakeTensor

from ..sampling.triton import import_kernel, pdl_options, pdl_requested, uses_pdl  # noqa: F401

_attention = import_kernel("decode_attention")
_norm = import_kernel("add_rms_norm")
_rope = import_kernel("qk_norm_rope_store")
_silu = import_kernel("silu_mul")
_skinny = import_kernel("skinny_linear")

import triton  # noqa: E402  (after import_kernel: it decides on the interpreter first)

MAX_SPLITS = 32  # flash-decoding splits of a row's keys at small batch
SKINNY_BLOCK_M = 16  # rows of skinny_linear's dot tile: the most rows its fused decode path takes


def _launch(kernel, grid, *args, **kwargs):
    if any(isinstance(a, FakeTensor) for a in args):
        return  # traced under FakeTensorMode: the launchers allocated every output already; nothing to compute
    # every launcher's first argument is a tensor on the step's device
    kwargs.update(pdl_options(args[0].device))
    kernel[grid](*args, **kwargs)


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual [M, N] += delta (in place, skipped when None); returns weight * rmsnorm(residual)."""
    M, N = residual.shape
    out = torch.empty_like(residual)
    _launch(_norm.add_rms_norm_kernel, (M,), residual, residual if delta is None else delta, weight, out, N, eps,
            HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(N), num_warps=_warps(N))
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [M, 2I] -> silu(gate) * up [M, I]."""
    M, two_i = gate_up.shape
    I = two_i // 2
    out = torch.empty((M, I), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(I))
    _launch(_silu.silu_mul_kernel, (M, triton.cdiv(I, block)), gate_up, out, I, BLOCK=block, num_warps=4)
    return out


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  norm_weight: torch.Tensor | None = None, eps: float = 0.0, silu_mul: bool = False,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(prologue(x), weight, bias) for a few rows (kernels/skinny_linear.py has the contract).

    norm_weight: x [M, K] is the residual stream, normed (RMSNorm, eps) on the way in. silu_mul: x [M, 2K] is
    gate_up, silu(gate) * up on the way in. residual [M, N]: the product is added to it in place, and it is
    returned; otherwise a new [M, N]."""
    M = x.shape[0]
    N, K = weight.shape
    if norm_weight is not None and silu_mul:
        raise ValueError("skinny_linear: norm_weight and silu_mul are exclusive prologues")
    if x.shape[1] != (2 * K if silu_mul else K) or not x.is_contiguous() or not weight.is_contiguous():
        raise ValueError(f"skinny_linear: x {tuple(x.shape)} (contiguous, K={K}{' x 2' if silu_mul else ''}) "
                         f"and weight {tuple(weight.shape)} (contiguous) do not fit")
    if residual is not None and (residual.shape != (M, N) or not residual.is_contiguous()):
        raise ValueError(f"skinny_linear: residual must be a contiguous [{M}, {N}], got {tuple(residual.shape)}")
    out = residual if residual is not None else torch.empty((M, N), dtype=x.dtype, device=x.device)
    block_n, block_k, stages = skinny_config(N, K, M, x.dtype, x.device)
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, SKINNY_BLOCK_M))
    _launch(_skinny.skinny_linear_kernel, grid, x, weight, weight if bias is None else bias,
            weight if norm_weight is None else norm_weight, out, M, N, K, eps,
            RMS_NORM=norm_weight is not None, SILU_MUL=silu_mul, HAS_BIAS=bias is not None,
            ADD_RESIDUAL=residual is not None, ROWS=min(SKINNY_BLOCK_M, triton.next_power_of_2(M)),
            BLOCK_M=SKINNY_BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            DOT_IN_FP32=x.dtype != torch.float32 and not x.is_cuda, num_warps=4, num_stages=stages)
    return out


def skinny_config(N: int, K: int, M: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, STAGES) of skinny_linear for a weight [N, K] and M rows.

    The widest column block that still gives every SM two programs (fewer, wider programs read longer
    contiguous runs; below two per SM the card idles), else the narrowest the form takes (one row, the FMA
    form: 4; more rows, the dot: 16); a weight tile of 8 KiB per stage in the FMA form, whose programs are
    many, 16 KiB in the dot's, so that the tiles in flight keep an SM's share of HBM busy. A rule, not an
    autotuner: nothing to benchmark at capture, the same config on every run, and
    bench/bench_skinny_linear.py --sweep measures the alternatives on the card."""
    programs = 2 * (_multiprocessors(_index(device)) if device.type == "cuda" and torch.cuda.is_available() else 132)
    if M == 1:  # the FMA form
        wider, narrowest, tile_bytes = (16, 8), 4, 8192
    else:  # the dot
        wider, narrowest, tile_bytes = (64, 32), 16, 16384
    block_n = next((b for b in wider if triton.cdiv(N, b) >= programs), narrowest)
    block_k = max(32, min(tile_bytes // dtype.itemsize // block_n, triton.next_power_of_2(K)))
    # The dot's narrow tiles carry a 16-row x tile beside the weight's: one stage fewer fits two programs per SM.
    return block_n, block_k, 3 if M > 1 and block_n == narrowest else 4


def qk_norm_rope_store(qkv, positions, slots, cos, sin, q_norm, k_norm, k_cache, v_cache, *, num_heads: int,
                       num_kv_heads: int, head_dim: int, tokens_per_row: int, eps: float) -> torch.Tensor:
    """qkv [M, (H + 2 Hkv) D] -> q [M, H, D]; writes k and v into the caches (see the kernel)."""
    M = qkv.shape[0]
    q = torch.empty((M, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    has_norm = q_norm is not None
    _launch(_rope.qk_norm_rope_store_kernel, (M, num_heads + 2 * num_kv_heads), qkv,
            q_norm if has_norm else qkv, k_norm if has_norm else qkv, cos, sin, positions, slots, q, k_cache, v_cache,
            tokens_per_row, k_cache.shape[1] - 1, qkv.stride(0), k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), eps, H=num_heads, HKV=num_kv_heads, HEAD_DIM=head_dim,
            HALF_BLOCK=triton.next_power_of_2(head_dim // 2), HAS_QK_NORM=has_norm, num_warps=1)
    return q


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     positions: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """q [B, T, H, D], caches [S, L + 1, Hkv, D], slots [B], positions [B, T] -> out [B, T, H, D]."""
    B, T, H, D = q.shape
    num_kv_heads = k_cache.shape[2]
    G = H // num_kv_heads
    block_m = 16 if T * G <= 16 else 64
    m_blocks = triton.cdiv(T * G, block_m)
    if splits is None:
        splits = _splits(B * num_kv_heads * m_blocks, q.device)
    out = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    positions = positions.contiguous()
    common = dict(G=G, HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=block_m, BLOCK_N=64,
                  SPLITS=splits, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                  DOT_IN_FP32=q.dtype == torch.bfloat16 and not q.is_cuda, num_warps=4)
    args = (T, num_kv_heads, k_cache.shape[1] - 1, D ** -0.5, q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
    grid = (B * num_kv_heads, m_blocks, splits)
    if splits == 1:
        _launch(_attention.decode_attention_kernel, grid, q, k_cache, v_cache, slots, positions, out, out, out, slots,
                *args, **common)
        return out
    partial = torch.empty((B, T, H, splits, D), dtype=torch.float32, device=q.device)
    lse = torch.empty((B, T, H, splits), dtype=torch.float32, device=q.device)
    counters = q if isinstance(q, FakeTensor) else _arrival_counters(q.device, B * num_kv_heads * m_blocks)
    _launch(_attention.decode_attention_kernel, grid, q, k_cache, v_cache, slots, positions, out, partial, lse,
            counters, *args, **common)
    return out


_counters: dict[tuple[torch.device, int], torch.Tensor] = {}


def _arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """The attention's arrival counters: zeroed once here, and every launch leaves them at zero (its last
    arrival resets its own), so one buffer serves every layer and every replay of a graph without a kernel
    to clear it. Kept for good, never replaced: a captured graph holds its address. Launches that share it
    must not overlap, which holds on one stream (with PDL too: a launch waits for the kernel before it before touching
    memory, kernels/pdl.py). First allocated in a graph's warm-up, outside the capture."""
    size = triton.next_power_of_2(n)
    key = (device, size)
    if key not in _counters:
        _counters[key] = torch.zeros(size, dtype=torch.int32, device=device)
    return _counters[key]


def _splits(programs: int, device: torch.device) -> int:
    """Split each row's keys until the programs fill the device about twice (a power of two, for the combine)."""
    if device.type != "cuda" or not torch.cuda.is_available():  # no device: a CPU run or a fake trace
        return 1
    sms = _multiprocessors(_index(device))
    splits = 1
    while splits < MAX_SPLITS and programs * splits < 2 * sms:
        splits *= 2
    return splits


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _warps(n: int) -> int:
    return 1 if n <= 256 else 4 if n <= 2048 else 8
