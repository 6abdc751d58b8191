"""Kernels per decoder layer on the CUDA path, counted on CPU (DESIGN.md §10: <= 12 per layer).

The CUDA forward (CausalLM._forward_triton) is run on CPU with its Triton kernels interpreted. Every
aten op that computes (not a view, not an allocation) is at least one CUDA kernel, and every Triton
launch is one; counting both over a forward of a 1-layer and a 3-layer model gives the kernels per layer.
The same count of the plain (SDPA) forward, which CUDA ran before, is 54 per decode step layer (7 GEMMs, 16
ops of RMSNorm, 2 index_put_ and 2 index_select of the cache...); an H200 profile showed about 62."""
import pytest
import torch
from tiny import build_model
from torch.utils._python_dispatch import TorchDispatchMode

from rsd_engine.models import load_model
from rsd_engine.models import triton_ops

BUDGET = 12
# Allocations, and a view that aten does not mark as one: no kernel.
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view"}


class CountKernels(TorchDispatchMode):
    """Counts aten ops that launch work; ops run inside a Triton launch (the interpreter's copies) are not
    the model's and are left out."""

    def __init__(self):
        super().__init__()
        self.ops, self.in_launch = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.in_launch and not func.is_view and name not in NO_KERNEL:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def kernels_of_forward(model, monkeypatch, tokens: int) -> int:
    mode = CountKernels()
    launch = triton_ops._launch

    def counted_launch(kernel, *args, **kwargs):
        mode.ops.append(kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel))
        mode.in_launch = True
        try:
            return launch(kernel, *args, **kwargs)
        finally:
            mode.in_launch = False

    monkeypatch.setattr(triton_ops, "_launch", counted_launch)
    # The worst case of CUDA: a row's keys split over programs (still one attention kernel: the last merges).
    monkeypatch.setattr(triton_ops, "_splits", lambda programs, device: 4)
    cache = model.new_cache(3, 32)
    ids = torch.arange(2 * tokens).view(2, tokens) + 5
    positions = torch.tensor([[3], [7]]) + torch.arange(tokens)
    with torch.no_grad(), mode:
        model(ids, positions, cache, torch.tensor([2, 0]), 16)
    return len(mode.ops)


@pytest.fixture(scope="module")
def qwen3_models(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("count")
    return [load_model(build_model(root / str(n), "qwen3", tokenizer_dir=tiny_tokenizer_dir, num_layers=n))
            for n in (1, 3)]


@pytest.mark.parametrize("tokens", [1, 4])  # a decode step; a verification of 4 tokens
@pytest.mark.parametrize("skinny", [False, True])
def test_cuda_path_kernels_per_layer_within_budget(qwen3_models, monkeypatch, tokens, skinny):
    one, three = qwen3_models
    for model in qwen3_models:
        model.use_triton = True
        model.skinny_rows = 16 if skinny else 0
    for model in qwen3_models:  # once-only work out of the count: RoPE tables, the attention's arrival counters
        kernels_of_forward(model, monkeypatch, tokens)
    per_layer = (kernels_of_forward(three, monkeypatch, tokens) - kernels_of_forward(one, monkeypatch, tokens)) / 2
    if skinny:
        # 4 skinny GEMMs (norm + qkv, o + residual, norm + gate_up, SiLU*up + down + residual), q/k-norm+RoPE+store
        # 1, attention 1.
        assert per_layer == 6 <= BUDGET
    else:
        # add+norm 2, GEMMs 4 (qkv, o, gate_up, down), q/k-norm+RoPE+store 1, attention 1, SiLU*up 1.
        assert per_layer == 9 <= BUDGET
