"""The CUDA path's Triton kernels as an sm_90 SM sees them, without a GPU (bench/kernel_resources.py): the
engine's launchers run on CPU tensors of real shapes, each launch is caught with the specialisation a CUDA
launch gets, compiled for sm_90, and ptxas reports its registers, spills and shared memory.

Guarded here: every form can launch (registers x threads and shared memory within an SM's); the sampler ops'
kernels (rsd_sample's, sample_tokens', rsd_verify's) and the plain decode step's (the decoder's at one token a
row) spill nothing; the skinny GEMMs keep the two
programs per SM that skinny_config's rule is built for. The measurement itself is checked on a kernel made to
spill and one that cannot."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "bench" / "kernel_resources.py"

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Triton's CUDA compiler ships for Linux")


def _run(args, timeout=900):
    pytest.importorskip("triton.backends.nvidia.compiler")
    import triton

    if not hasattr(triton, "knobs"):  # the launch hook the tool catches launches with: Triton 3.4 on
        pytest.skip(f"triton {triton.__version__} has no triton.knobs (3.4 and later do)")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    return done.stdout


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("resources") / "resources.json"
    _run([str(TOOL), "--quick", "--json", str(out)])
    return json.loads(out.read_text())["rows"]


def test_every_launch_is_caught_with_the_cuda_launch_shape(rows):
    kernels = {r["kernel"] for r in rows}
    assert {"stats_kernel", "round_kernel", "law_kernel", "pick_kernel", "sample_final_kernel", "failed_kernel",
            "residual_kernel", "add_rms_norm_kernel", "skinny_linear_kernel", "qk_norm_rope_store_kernel",
            "decode_attention_kernel", "silu_mul_kernel", "uniforms_kernel"} <= kernels
    sampler = [r for r in rows if r["use"].startswith(("rsd_sample", "sample_tokens", "rsd_verify"))]
    assert all(r["num_warps"] == 8 and r["constexprs"]["SEG"] == 4096 for r in sampler)  # CUDA_CONFIG, not the
    # interpreter's; and the bf16 dots of the attention as compiled, not the interpreter's fp32 workaround
    assert all(r["constexprs"]["DOT_IN_FP32"] is False for r in rows if r["kernel"] == "decode_attention_kernel")


def test_every_form_fits_an_sm(rows):
    assert [r for r in rows if not r["launchable"] or r["programs_per_sm"] < 1] == []


def test_the_sampler_ops_and_the_plain_decode_step_spill_nothing(rows):
    """rsd_verify's failed, residual and pick kernels spilled 124-416 bytes a thread at 255 registers over
    whole segments; they take tiles of CUDA_CONFIG's TILE ids now."""
    checked = [r for r in rows if r["use"].startswith(("rsd_sample", "sample_tokens", "rsd_verify"))
               or r["use"].endswith("x 1 token(s)") or r["use"] == "the step's uniforms"]
    assert {r["kernel"] for r in checked} >= {"stats_kernel", "round_kernel", "law_kernel", "pick_kernel",
                                               "failed_kernel", "residual_kernel", "skinny_linear_kernel",
                                               "decode_attention_kernel"}
    assert any(r["kernel"] == "pick_kernel" and r["use"].startswith("rsd_verify") for r in checked)
    assert [(r["kernel"], r["use"], r["spill_stores"], r["spill_loads"]) for r in checked
            if r["spill_stores"] or r["spill_loads"]] == []


def test_skinny_gemms_keep_two_programs_per_sm(rows):
    skinny = [r for r in rows if r["kernel"] == "skinny_linear_kernel"]
    assert len(skinny) >= 6
    assert [(r["use"], r["constexprs"], r["shared"]) for r in skinny if r["programs_per_sm"] < 2] == []


SPILL_CHECK = """
import sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
import kernel_resources as kr  # sets TRITON_INTERPRET=0 before triton loads
import torch
import probe
recorder = kr.Recorder()
x = torch.zeros(1 << 14, dtype=torch.float64)
with recorder.catching("probe"):
    probe.tile_sum[(1,)](x, x, BLOCK=1 << 14, num_warps=1)  # 512 fp64 values a thread: far past 255 registers
    probe.tile_sum[(1,)](x, x, BLOCK=64, num_warps=1)
for launch in recorder.launches:
    row = kr.resources(launch)
    print(row["constexprs"]["BLOCK"], row["registers"], row["spill_stores"], row["spill_loads"])
"""
PROBE = """
import triton
import triton.language as tl


@triton.jit
def tile_sum(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    y = tl.load(x_ptr + BLOCK - 1 - offs)
    tl.store(out_ptr + offs, tl.cumsum(x * y, 0) + tl.sum(x, 0))
"""


def test_spills_are_measured(tmp_path):
    (tmp_path / "probe.py").write_text(textwrap.dedent(PROBE))
    out = _run(["-c", SPILL_CHECK, str(ROOT / "bench"), str(tmp_path)], timeout=300).split("\n")
    big, small = ([int(v) for v in line.split()] for line in out[:2])
    assert big[0] == 1 << 14 and big[2] > 1000 and big[3] > 1000  # (ptxas gives up on registers there)
    assert small[0] == 64 and 0 < small[1] < 64 and small[2] == small[3] == 0


def test_every_pdl_launch_waits_before_touching_memory(tmp_path):
    """With RSD_PDL=on (kernels/pdl.py) a kernel may be scheduled while the one before it still runs: each of the
    decoder's and the sampler's kernels, compiled as launched that way, must wait (griddepcontrol.wait) before its
    first load or store of global memory, whatever the compiler hoists. (Launched without PDL, the kernels are
    unchanged.) The sampler's forms still spill nothing."""
    out = tmp_path / "pdl.json"
    _run([str(TOOL), "--quick", "--pdl", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    pdl = [r for r in rows if "pdl_wait_first" in r]
    assert {r["kernel"] for r in pdl} == {"add_rms_norm_kernel", "skinny_linear_kernel", "qk_norm_rope_store_kernel",
                                           "decode_attention_kernel", "silu_mul_kernel", "stats_kernel",
                                           "round_kernel", "law_kernel", "pick_kernel", "sample_final_kernel",
                                           "failed_kernel", "residual_kernel"}
    assert all(r["constexprs"]["PDL"] is True for r in pdl)
    assert [(r["kernel"], r["use"]) for r in pdl if not r["pdl_wait_first"]] == []
    assert [r for r in rows if not r["launchable"]] == []
    sampler = [r for r in rows if r["use"].startswith(("rsd_sample", "sample_tokens", "rsd_verify"))]
    assert sampler and [(r["kernel"], r["use"]) for r in sampler if r["spill_stores"] or r["spill_loads"]] == []


WAIT_CHECK = """
import sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
import kernel_resources as kr
import torch
import probe
recorder = kr.Recorder()
x = torch.zeros(64)
with recorder.catching("probe"):
    probe.copy_late[(1,)](x, x, BLOCK=64, PDL=True)
    probe.copy_early[(1,)](x, x, BLOCK=64, PDL=True)
for launch in recorder.launches:
    print(launch.name, kr.resources(launch)["pdl_wait_first"])
"""
WAIT_PROBE = """
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait


@triton.jit
def copy_late(x_ptr, out_ptr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs) + 1)


@triton.jit
def copy_early(x_ptr, out_ptr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(out_ptr + offs, x + 1)
    if PDL:
        gdc_wait()
    tl.store(out_ptr + offs, x + 2)
"""


def test_a_load_before_the_wait_is_caught(tmp_path):
    (tmp_path / "probe.py").write_text(textwrap.dedent(WAIT_PROBE))
    out = _run(["-c", WAIT_CHECK, str(ROOT / "bench"), str(tmp_path)], timeout=300).split("\n")
    assert out[:2] == ["copy_late True", "copy_early False"]
