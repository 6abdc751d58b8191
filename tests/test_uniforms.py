"""kernels/uniforms.py: the step's uniforms in one launch, bit for bit the torch ops of randomness.py (their
reference), under the interpreter on CPU (compiled on CUDA where a device exists) and compiled for sm_80/sm_90
without a GPU; and the engine's tokens do not change when its steps take the kernel."""
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rsd_engine import Engine, SamplingParams
from rsd_engine import randomness
from rsd_engine.randomness import NUM_DRAWS, NUM_ROUND_DRAWS, round_uniforms, step_uniforms, step_uniforms_torch
from triton_device import TRITON_DEVICE

_random = random.Random(15)
SEEDS = [0, 1, 2**32 - 1, 2**32, 2**63 - 1, _random.getrandbits(63)]
STEPS = [0, 1, 2**31, 2**40 + 7, _random.getrandbits(48)]


def grid():
    """Every (seed, step) pair of SEEDS x STEPS, as [B] int64 tensors."""
    seeds = torch.tensor(SEEDS, dtype=torch.int64).repeat_interleave(len(STEPS))
    steps = torch.tensor(STEPS, dtype=torch.int64).repeat(len(SEEDS))
    return seeds, steps


@pytest.mark.parametrize("num_draws", [1, 3, NUM_DRAWS, NUM_ROUND_DRAWS])
def test_step_uniforms_kernel_equals_torch_bit_for_bit(num_draws, monkeypatch):
    monkeypatch.setattr(randomness, "KERNEL_ON_CPU", True)
    seeds, steps = grid()
    got = step_uniforms(seeds.to(TRITON_DEVICE), steps.to(TRITON_DEVICE), num_draws).cpu()
    want = step_uniforms_torch(seeds, steps, num_draws)
    assert got.shape == want.shape == (len(SEEDS) * len(STEPS), num_draws)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert ((want > 0) & (want <= 1)).all() and want.unique().numel() > want.numel() * 0.99  # not a constant


@pytest.mark.parametrize("num_positions", [1, 2, 5])
def test_round_uniforms_kernel_equals_torch_bit_for_bit(num_positions, monkeypatch):
    seeds, steps = grid()
    want = round_uniforms(seeds, steps, num_positions)  # the torch ops: KERNEL_ON_CPU is off
    monkeypatch.setattr(randomness, "KERNEL_ON_CPU", True)
    got = round_uniforms(seeds.to(TRITON_DEVICE), steps.to(TRITON_DEVICE), num_positions).cpu()
    assert got.shape == want.shape == (len(SEEDS) * len(STEPS), num_positions, NUM_ROUND_DRAWS)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    # Position i of a round is the plain step start + i, its first NUM_DRAWS columns a plain step's draws.
    for i in range(num_positions):
        assert torch.equal(got[:, i, :NUM_DRAWS], step_uniforms_torch(seeds, steps + i))


def test_each_draw_of_a_round_position_has_its_own_column():
    """DESIGN.md §8: the draft, the keep test, the residual and the flag of a position each have a draw of their own,
    after the plain step's NUM_DRAWS (the fallback and the proposals, which the bonus token reads as a plain step)."""
    from rsd_engine.randomness import DRAFT_DRAW, FALLBACK_DRAW, FLAG_DRAW, KEEP_DRAW, RESIDUAL_DRAW

    assert sorted([DRAFT_DRAW, KEEP_DRAW, RESIDUAL_DRAW, FLAG_DRAW]) == list(range(NUM_DRAWS, NUM_ROUND_DRAWS))
    assert 0 <= FALLBACK_DRAW < NUM_DRAWS


def test_one_launch_per_call(monkeypatch):
    """The point of the kernel: on CUDA the torch ops are ~70 kernels per call."""
    monkeypatch.setattr(randomness, "KERNEL_ON_CPU", True)
    kernel, launches = randomness._uniforms_kernel(), []

    class Counted:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(randomness, "_uniforms_kernel", Counted)
    seeds, steps = grid()
    step_uniforms(seeds, steps)
    round_uniforms(seeds, steps, 5)
    assert len(launches) == 2


@pytest.mark.parametrize("draft_tokens", [0, 2])
def test_engine_tokens_unchanged_with_the_kernel(tiny_pair, monkeypatch, draft_tokens):
    """A sampled (not greedy) generation reads the uniforms at every step: same tokens either way."""
    engine = Engine(*tiny_pair, device="cpu", max_batch_size=2, max_seq_len=48, sampler="reference",
                    draft_tokens=draft_tokens)
    prompts = ["The answer is", "1 + 1 ="]
    params = SamplingParams(max_new_tokens=8, threshold=0.3, seed=7)
    plain = [r.token_ids for r in engine.generate_batch(prompts, params)]
    monkeypatch.setattr(randomness, "KERNEL_ON_CPU", True)
    assert [r.token_ids for r in engine.generate_batch(prompts, params)] == plain


COMPILE = """
import importlib.util, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
spec = importlib.util.spec_from_file_location("uniforms", f"{sys.argv[1]}/uniforms.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
kernel = module.uniforms_kernel
signature = {"seeds_ptr": "*i64", "start_steps_ptr": "*i64", "out_ptr": "*fp32", "total": "i32", "P": "i32",
             "D": "i32", "BLOCK": "constexpr"}
source = ASTSource(kernel, signature, {(kernel.arg_names.index("BLOCK"),): 256})
for capability in (80, 90):
    triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 4})
print("compiled")
"""


def test_kernel_compiles_for_cuda_without_a_gpu():
    pytest.importorskip("triton.backends.nvidia.compiler")
    kernels = Path(__file__).resolve().parents[1] / "kernels"
    done = subprocess.run([sys.executable, "-c", COMPILE, str(kernels)], env={**os.environ, "TRITON_INTERPRET": "0"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["compiled"]
