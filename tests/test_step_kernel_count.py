"""Kernels of one whole CUDA decode step, counted on CPU: (kernels per layer x layers) + a fixed part.

The step the engine captures as a CUDA graph (Engine._capture's ``run``: both forwards, the logits, the
uniforms, the fused sampler, the rows' advance, packing the outputs into StepState.out) runs on CPU with
every choice CUDA makes: the models' Triton forward, the Triton sampler and the Triton uniforms, all
interpreted. As in test_kernel_count.py, every aten op that computes is at least one CUDA kernel and every
Triton launch is one. Ops inside the two model forwards are told apart from the rest; the teacher has one
layer more than the student, which gives the kernels per layer and the forward's own (embedding, final
norm). Before this count existed the fixed part was 106: 78 int64 ops for the uniforms, 11 for the
advance, 6 for the packing; then 25 (the sampler: 6 launches), now 14 (the advance and the packing one
launch). With the skinny GEMMs 6 per layer: the 1.7B/0.6B pair (56 layers) is 56 x 6 + 14 = 350 kernels
per step, 722 on the H200 profile before."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.interpreter import InterpretedFunction

from rsd_engine import Engine
from rsd_engine import randomness
from rsd_engine.models import triton_ops
from rsd_engine.models.transformer import CausalLM

NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view"}


class StepKernels(TorchDispatchMode):
    """Kernels by where they run: ``forward`` (inside a model's forward) or ``step`` (the rest)."""

    def __init__(self):
        super().__init__()
        self.ops = {"forward": [], "step": []}
        self.where, self.in_launch = "step", False

    def add(self, name):
        self.ops[self.where].append(name)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        # aten marks ``to`` (a dtype cast: ``.double()``, ``.long()``) as a view: it is one only when it aliases.
        if func.is_view and not (isinstance(out, torch.Tensor) and not _aliases(out, args[0])):
            return out
        if not self.in_launch and name not in NO_KERNEL:
            self.add(name)
        return out


def _aliases(out: torch.Tensor, source) -> bool:
    return isinstance(source, torch.Tensor) and out.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()


def count_step(engine, monkeypatch, rows: int) -> tuple[StepKernels, dict]:
    mode, per_model = StepKernels(), {}
    run = InterpretedFunction.run

    def launch(self, *args, **kwargs):  # every Triton launch, whoever makes it (models, sampler, uniforms)
        mode.add(self.fn.__name__)
        mode.in_launch = True
        try:
            return run(self, *args, **kwargs)
        finally:
            mode.in_launch = False

    forward = CausalLM.forward

    def counted_forward(model, *args, **kwargs):
        before, mode.where = len(mode.ops["forward"]), "forward"
        try:
            return forward(model, *args, **kwargs)
        finally:
            mode.where = "step"
            per_model[model] = len(mode.ops["forward"]) - before

    monkeypatch.setattr(InterpretedFunction, "run", launch)
    monkeypatch.setattr(CausalLM, "forward", counted_forward)
    graphs = engine._capture(engine.max_seq_len)  # no CUDA: calling it runs the step the graph would hold
    with torch.inference_mode(), mode:
        graphs(rows)
    return mode, per_model


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts the CUDA path on CPU tensors, under the interpreter")
def test_decode_step_kernels(tiny_pair, monkeypatch):
    engine = Engine(*tiny_pair, device="cpu", dtype="float32", max_batch_size=2, max_seq_len=64, sampler="triton")
    for model in (engine.teacher, engine.student):
        model.use_triton = True  # the CUDA forward
        model.skinny_rows = 16  # the fused skinny GEMMs, where the probe finds them faster than cuBLAS
    monkeypatch.setattr(randomness, "KERNEL_ON_CPU", True)
    monkeypatch.setattr(triton_ops, "_splits", lambda programs, device: 4)  # CUDA's small batch: split attention
    count_step(engine, monkeypatch, 2)  # once-only work out of the count (RoPE tables, arrival counters)
    mode, per_model = count_step(engine, monkeypatch, 2)
    layers = {m: m.config.num_layers for m in per_model}
    assert sorted(layers.values()) == [2, 3]
    per_layer = per_model[engine.teacher] - per_model[engine.student]
    forward_own = per_model[engine.student] - 2 * per_layer  # embedding, final norm
    fixed = len(mode.ops["step"]) + 2 * forward_own
    print(f"\nper layer {per_layer}; fixed {fixed} = outside the forwards {len(mode.ops['step'])} "
          f"+ 2 x {forward_own} in each forward; outside: {sorted(mode.ops['step'])}")
    assert per_layer == 6  # 9 with cuBLAS GEMMs (tests/test_kernel_count.py)
    assert forward_own == 2  # the embedding gather, the final add + norm
    # 2 x (embedding, final norm) 4, logits GEMMs 2, uniforms 1, sampler launches 6, the rows' advance and the
    # outputs' packing 1 (kernels/advance.py; 8 + 4 torch ops before).
    assert fixed == 14


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts the CUDA path on CPU tensors, under the interpreter")
def test_speculative_round_kernels(tiny_pair, monkeypatch):
    """A speculative round (draft_tokens = 4) as the engine captures it: G + 1 student forwards, G draws,
    one teacher forward over G + 1 positions, rsd_verify, the rows' advance and the packing. Outside the
    forwards: the uniforms (1), sample_tokens (4 x 5 launches), rsd_verify (8), the rows' advance and the
    packing (1: kernels/advance.py's round kernel; 39 torch kernels before, 95 a round then), the logits
    heads (6) and the torch glue; rsd_verify's parameters are read per row, not copied per position (9
    repeat_interleave kernels a round before that)."""
    engine = Engine(*tiny_pair, device="cpu", dtype="float32", max_batch_size=2, max_seq_len=64, sampler="triton",
                    draft_tokens=4)
    for model in (engine.teacher, engine.student):
        model.use_triton = True
        model.skinny_rows = 16
    monkeypatch.setattr(randomness, "KERNEL_ON_CPU", True)
    monkeypatch.setattr(triton_ops, "_splits", lambda programs, device: 4)
    capture = engine._capture
    monkeypatch.setattr(engine, "_capture", lambda kv, step=None: capture(kv, engine._speculative._round_and_advance))
    count_step(engine, monkeypatch, 2)
    mode, _ = count_step(engine, monkeypatch, 2)
    outside = mode.ops["step"]
    print(f"\noutside the forwards: {len(outside)}: {sorted(outside)}")
    assert "repeat_interleave" not in outside
    assert sum(name.endswith("_kernel") for name in outside) == 1 + 4 * 5 + 8 + 1
    assert "round_advance_pack_kernel" in outside and "amin" not in outside and "gather" not in outside
    assert len(outside) <= 56
