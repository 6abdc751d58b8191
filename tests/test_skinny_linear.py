"""kernels/skinny_linear.py under the interpreter against PyTorch (every prologue and epilogue, biases, row
counts of a decode step, a verification round and a full dot tile, shapes off the block sizes); the probe's
choice of the row limit with a fake timer; the kernel compiled for sm_90 without a GPU (with the 16-divisible
strides and the pipelined loads a real launch gets). The fused forward against HF: tests/test_models.py
::test_triton_forward_matches_hf (skinny cases); its kernel count: tests/test_kernel_count.py."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from rsd_engine.models import skinny
from rsd_engine.models import triton_ops as ops
from rsd_engine.models.transformer import RMSNorm

N, K, EPS = 72, 88, 1e-6  # neither a multiple of the column block (16) nor of the K block (32 on CPU here)


@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("prologue", [None, "rms_norm", "silu_mul"])
@pytest.mark.parametrize("add_residual", [False, True])
@pytest.mark.parametrize("has_bias", [False, True])
def test_matches_pytorch(M, prologue, add_residual, has_bias, monkeypatch):
    g = torch.Generator().manual_seed(M * 100 + 3)
    monkeypatch.setattr(ops, "skinny_config", lambda n, k, m, dtype, device: (16, 32, 2))  # several blocks on both axes
    weight = torch.randn(N, K, generator=g)
    bias = torch.randn(N, generator=g) if has_bias else None
    x = torch.randn(M, 2 * K if prologue == "silu_mul" else K, generator=g) * 3
    norm = RMSNorm(K, EPS)
    norm.weight.data = torch.randn(K, generator=g)
    residual = torch.randn(M, N, generator=g)
    stream = residual.clone()

    out = ops.skinny_linear(x, weight, bias, norm_weight=norm.weight if prologue == "rms_norm" else None, eps=EPS,
                            silu_mul=prologue == "silu_mul", residual=stream if add_residual else None)

    inputs = norm(x) if prologue == "rms_norm" else F.silu(x[:, :K]) * x[:, K:] if prologue == "silu_mul" else x
    expected = F.linear(inputs, weight, bias) + (residual if add_residual else 0)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    if add_residual:
        assert out.data_ptr() == stream.data_ptr()  # updated in place, returned
    else:
        assert torch.equal(stream, residual)


def test_prologues_and_epilogue_round_as_the_kernels_they_replace():
    """In bf16, through an identity weight (the fp32 product is exact): the RMSNorm prologue gives
    add_rms_norm's output bit for bit, the SiLU prologue silu_mul's, and the residual epilogue add_rms_norm's
    residual update (HF's x + o_proj(...))."""
    g = torch.Generator().manual_seed(11)
    M, K = 3, 64
    eye = torch.eye(K, dtype=torch.bfloat16)
    x = (torch.randn(M, K, generator=g) * 4).to(torch.bfloat16)
    norm_weight = torch.randn(K, generator=g).to(torch.bfloat16)
    assert torch.equal(ops.skinny_linear(x, eye, norm_weight=norm_weight, eps=EPS),
                       ops.add_rms_norm(x.clone(), None, norm_weight, EPS))
    gate_up = (torch.randn(M, 2 * K, generator=g) * 4).to(torch.bfloat16)
    assert torch.equal(ops.skinny_linear(gate_up, eye, silu_mul=True), ops.silu_mul(gate_up))
    residual = (torch.randn(M, K, generator=g) * 4).to(torch.bfloat16)
    stream = residual.clone()
    # Kernel against kernel: the interpreter rounds to bf16 its own way (the card to nearest even, as torch).
    ops.add_rms_norm(stream, x, norm_weight, EPS)
    assert torch.equal(ops.skinny_linear(x, eye, residual=residual.clone()), stream)


@pytest.mark.parametrize("M", [1, 20])
def test_default_config_one_row_and_rows_past_a_tile(M):
    """The launcher's own config: the FMA form at one row (4 columns a program), and more rows than one dot
    tile (a second program row)."""
    g = torch.Generator().manual_seed(7)
    gate_up, weight, residual = torch.randn(M, 80, generator=g), torch.randn(24, 40, generator=g), torch.randn(M, 24)
    out = ops.skinny_linear(gate_up, weight, silu_mul=True, residual=residual.clone())
    torch.testing.assert_close(out, residual + F.linear(F.silu(gate_up[:, :40]) * gate_up[:, 40:], weight),
                               atol=1e-4, rtol=1e-4)


def test_refuses_shapes_that_do_not_fit():
    x, weight = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="do not fit"):
        ops.skinny_linear(x, weight, silu_mul=True)  # silu_mul wants x [M, 2K]
    with pytest.raises(ValueError, match="residual"):
        ops.skinny_linear(x, weight, residual=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="exclusive"):
        ops.skinny_linear(torch.randn(2, 16), weight, norm_weight=torch.ones(8), silu_mul=True)


def test_config_fills_the_card():
    """Two programs per SM where the columns allow, wider blocks only then; 8 KiB weight tiles for one row
    (the FMA form, columns down to 4), 16 KiB for the dot (columns down to 16)."""
    cpu, bf16 = torch.device("cpu"), torch.bfloat16  # the CPU counts as 132 SMs
    assert ops.skinny_config(1024, 2048, 1, bf16, cpu) == (4, 1024, 4)  # 256 programs
    assert ops.skinny_config(4096, 1024, 1, bf16, cpu) == (8, 512, 4)  # 512 programs
    assert ops.skinny_config(24576, 4096, 1, bf16, cpu) == (16, 256, 4)
    assert ops.skinny_config(1024, 2048, 5, bf16, cpu) == (16, 512, 3)  # 64 programs: as many as the dot allows
    assert ops.skinny_config(12288, 2048, 5, bf16, cpu) == (32, 256, 4)  # 384 programs
    assert ops.skinny_config(24576, 4096, 16, bf16, cpu) == (64, 128, 4)  # 384 programs
    assert ops.skinny_config(1024, 2048, 5, torch.float32, cpu) == (16, 256, 3)  # 16 KiB of fp32
    assert ops.skinny_config(64, 20, 5, bf16, cpu) == (16, 32, 3)  # K below a tile: the smallest dot K


@pytest.mark.parametrize("won, expected", [
    ({1: True, 2: True, 4: True, 8: True, 16: True}, 16),
    ({1: True, 2: True, 4: True, 8: False, 16: True}, 4),  # a later win does not cover the loss at 8
    ({1: False, 2: True, 4: True, 8: True, 16: True}, 0),
    ({1: True, 2: False, 4: False, 8: False, 16: False}, 1),
])
def test_probe_chooses_the_largest_row_count_won_throughout(won, expected):
    calls = []

    def fake_timer(skinny_path: bool, rows: int) -> float:
        calls.append((skinny_path, rows))
        return 1.0 if skinny_path == won[rows] else 2.0

    assert skinny.choose(fake_timer) == expected
    first_loss = next((m for m in skinny.PROBE_ROWS if not won[m]), None)
    assert max(rows for _, rows in calls) == (first_loss or 16)  # stops at the first loss
    assert skinny.choose(lambda s, m: 1.0) == 0  # a tie is no win


@pytest.mark.parametrize("mode, expected", [("off", 0), ("on", 16), ("auto", 0), (" ON ", 16)])
def test_mode_override_off_cuda(monkeypatch, mode, expected):
    """Off CUDA nothing is probed: auto is off, on is on (tests force the path this way)."""
    monkeypatch.setenv("RSD_SKINNY_GEMM", mode)
    model = SimpleNamespace(device=torch.device("cpu"))
    assert skinny.row_limit(model) == expected
    monkeypatch.setenv("RSD_SKINNY_GEMM", "fast")
    with pytest.raises(ValueError, match="RSD_SKINNY_GEMM"):
        skinny.row_limit(model)


def test_probe_on_cuda_records_times_and_runs_once_per_shape(monkeypatch):
    """auto on a (pretend) CUDA model: the timer's verdict becomes the limit, its times are kept on the
    model, and a second model of the same config, dtype and device reuses the answer without timing."""
    timed = []

    class FakeTimer:
        def __init__(self, model):
            pass

        def __call__(self, skinny_path, rows):
            timed.append((skinny_path, rows))
            return (10.0 if skinny_path else 20.0) * (1 if rows <= 4 else 3 if skinny_path else 1)

    monkeypatch.setenv("RSD_SKINNY_GEMM", "auto")
    monkeypatch.setattr(skinny, "GraphTimer", FakeTimer)
    monkeypatch.setattr(skinny, "_probed", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    model = lambda: SimpleNamespace(device=torch.device("cuda"), config=("a config",), dtype=torch.bfloat16,  # noqa: E731
                                    skinny_probe=None)
    first, second = model(), model()
    assert skinny.row_limit(first) == 4
    assert first.skinny_probe[8] == {"skinny_us": 30.0, "cublas_us": 20.0} and 16 not in first.skinny_probe
    assert len(timed) == 8
    assert skinny.row_limit(second) == 4 and second.skinny_probe == first.skinny_probe and len(timed) == 8


def test_failed_probe_warns_and_leaves_todays_path(monkeypatch):
    """On CUDA a probe that raises (a kernel that does not compile there) gives 0 and one warning."""

    def broken(*args, **kwargs):
        raise RuntimeError("PTX too new\nmore lines")

    monkeypatch.setenv("RSD_SKINNY_GEMM", "auto")
    monkeypatch.setattr(skinny, "GraphTimer", broken)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    with pytest.warns(UserWarning, match="skinny-GEMM path off: its probe failed .RuntimeError: PTX too new.$"):
        assert skinny.row_limit(SimpleNamespace(device=torch.device("cuda"))) == 0


def test_benchmark_runs_and_both_paths_agree(tmp_path):
    """bench/bench_skinny_linear.py on CPU (a tiny layer, interpreted): every op and the whole layer by both
    paths, same outputs."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_skinny_linear import main

    main(["--device", "cpu", "--repeats", "1", "--budget", "0", "--json", str(tmp_path / "out.json")])
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert [(r["op"], r["M"]) for r in rows] == [(op, M) for op in ("qkv", "o", "gate_up", "down", "layer")
                                                 for M in (1, 5)]
    assert all(r["max_abs_diff"] < 1e-5 for r in rows), rows


COMPILE = """
import importlib, sys, types
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
# kernels/ as a package of its own name (skinny_linear.py imports pdl.py relatively; "kernels" itself would be the
# Hugging Face distribution of that name where it is installed)
package = types.ModuleType("rsd_kernels_under_test")
package.__path__ = [sys.argv[1]]
sys.modules[package.__name__] = package
kernel = importlib.import_module(package.__name__ + ".skinny_linear").skinny_linear_kernel
VARIANTS = [dict(RMS_NORM=True, SILU_MUL=False, HAS_BIAS=True, ADD_RESIDUAL=False),  # qkv (Qwen2's bias)
            dict(RMS_NORM=False, SILU_MUL=False, HAS_BIAS=False, ADD_RESIDUAL=True),  # o_proj
            dict(RMS_NORM=True, SILU_MUL=False, HAS_BIAS=False, ADD_RESIDUAL=False),  # gate_up
            dict(RMS_NORM=False, SILU_MUL=True, HAS_BIAS=False, ADD_RESIDUAL=True)]  # down
CONFIGS = [(1, 4, 1024, 4, "bf16"), (1, 16, 256, 4, "bf16"), (2, 16, 512, 3, "bf16"), (16, 64, 128, 4, "bf16"),
           (4, 16, 256, 3, "fp32")]  # ROWS, BLOCK_N, BLOCK_K, STAGES
# Each as launched plainly, and the decode forms (one row, 16) also as launched with RSD_PDL=on (kernels/pdl.py).
for variant in VARIANTS:
    for (rows, block_n, block_k, stages, dtype), pdl in [(c, False) for c in CONFIGS] + [(CONFIGS[0], True),
                                                                                         (CONFIGS[3], True)]:
        constexprs = dict(variant, ROWS=rows, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages,
                          DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", DOT_IN_FP32=False, PDL=pdl)
        signature = {n: "constexpr" if n in constexprs else f"*{dtype}" if n.endswith("_ptr") else "fp32" if n == "eps"
                     else "i32" for n in kernel.arg_names}
        # As a launch specialises them: pointers and N, K divisible by 16 (M is not specialised).
        aligned = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in kernel.arg_names
                   if signature[n] != "constexpr" and n not in ("M", "eps")}
        source = ASTSource(kernel, signature, {(kernel.arg_names.index(n),): v for n, v in constexprs.items()}, aligned)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 4, "num_stages": stages})
        # The weight stream must be software-pipelined (cp.async stages), else it runs at a fraction of HBM;
        # and two programs must fit an SM's shared memory (228 KiB).
        print(compiled.asm["ptx"].count("cp.async") > 0 and compiled.metadata.shared <= 114 * 1024)
"""


def test_compiles_for_sm90_and_pipelines_without_a_gpu():
    pytest.importorskip("triton.backends.nvidia.compiler")
    path = Path(__file__).resolve().parents[1] / "kernels"
    done = subprocess.run([sys.executable, "-c", COMPILE, str(path)], env={**os.environ, "TRITON_INTERPRET": "0"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True"] * 28
