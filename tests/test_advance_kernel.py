"""kernels/advance.py, the CUDA step's advance and packing in one launch, against the engine's torch ops (its
reference and the CPU path), under Triton's interpreter: flagged rows, padding rows in the scratch slot, and
student tokens that stand for several teacher tokens."""
import pytest
import torch

from rsd_engine import Engine, randomness
from rsd_engine.sampling import VerifyOutput
from rsd_engine.sampling.reference import SampleOutput
from rsd_engine.step import STEP_INPUTS, advance_and_pack, pack_outputs, round_advance_and_pack

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="runs the kernel on CPU tensors, interpreted")


@pytest.fixture(scope="module")
def engine(tiny_pair):
    engine = Engine(*tiny_pair, device="cpu", dtype="float32", max_batch_size=4, max_seq_len=64, sampler="reference")
    V = engine.space.size
    # Mapped tokens: id t ends its teacher pieces at (7 t) mod V after t mod 3 + 1 of them.
    engine._teacher_next = (torch.arange(V) * 7) % V
    engine._teacher_advance = torch.arange(V) % 3 + 1
    return engine


def state(B, V, with_slots, seed):
    gen = torch.Generator().manual_seed(seed)
    inputs = {name: torch.randint(0, 50, (B,), generator=gen).to(dtype) for name, dtype in STEP_INPUTS.items()}
    inputs["slots"] = torch.tensor([0, 1, 4, 2, 4, 3][:B])  # 4 is the scratch slot: padding rows
    if not with_slots:
        del inputs["slots"]
    token = torch.randint(0, V, (B,), generator=gen)
    token[1] = -2  # flagged by the sampler
    sampled = SampleOutput(token, torch.rand(B, generator=gen) < 0.5, torch.randn(B, generator=gen),
                           torch.randn(B, generator=gen))
    sampled.teacher_logprob[1] = float("nan")
    return inputs, sampled


def kernel_matches_torch(monkeypatch, wrapper_path, wrapper, step, inputs, columns):
    """Runs ``step(state, out)`` with the torch ops, then with the kernels forced onto CPU tensors (through
    ``wrapper``, patched at ``wrapper_path`` to count its launches): one launch there and none here, and the
    packed outputs and the rows' state equal."""
    results = []
    for kernel in (False, True):
        monkeypatch.setattr(randomness, "KERNEL_ON_CPU", kernel)
        launches = []
        monkeypatch.setattr(wrapper_path, lambda *a, **k: launches.append(1) or wrapper(*a, **k))
        state_copy = {k: v.clone() for k, v in inputs.items()}
        out = torch.zeros(next(iter(inputs.values())).shape[0], columns, dtype=torch.float64)
        with torch.inference_mode():
            step(state_copy, out)
        assert len(launches) == int(kernel)
        results.append((out, state_copy))
    (out_a, state_a), (out_b, state_b) = results
    assert torch.equal(out_a.nan_to_num(123.0), out_b.nan_to_num(123.0))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


@pytest.mark.parametrize("with_slots", [True, False], ids=["slots", "rows-in-order"])
def test_advance_kernel_moves_rows_and_packs_as_the_torch_ops(engine, with_slots):
    B = 6 if with_slots else 4
    inputs, sampled = state(B, engine.space.size, with_slots, seed=3)
    expected_inputs = {k: v.clone() for k, v in inputs.items()}
    engine._advance(expected_inputs, sampled.token)
    expected = pack_outputs([sampled.token, sampled.accepted, sampled.teacher_logprob, sampled.student_logprob],
                            torch.zeros(B, 4, dtype=torch.float64))
    out = torch.full((B, 4), -7.0, dtype=torch.float64)
    advance_and_pack(inputs, sampled, engine._teacher_next, engine._teacher_advance, engine.max_batch_size, out)
    assert torch.equal(out.nan_to_num(123.0), expected.nan_to_num(123.0))
    for name in expected_inputs:
        assert torch.equal(inputs[name], expected_inputs[name]), name
    if with_slots:  # the padding rows stayed put; the others moved, a mapped token by its pieces
        moved = torch.tensor([1, 1, 0, 1, 0, 1])
        assert torch.equal(inputs["steps"] - state(B, engine.space.size, True, seed=3)[0]["steps"], moved)


def test_the_engine_step_takes_one_launch_for_it(engine, monkeypatch):
    """The captured step (``out`` given) on CUDA, or with the kernels forced onto CPU tensors, packs through
    the kernel; the tokens and the state equal the torch ops'."""
    B = 3
    gen = torch.Generator().manual_seed(5)
    inputs = {name: torch.randint(1, 9, (B,), generator=gen).to(dtype) for name, dtype in STEP_INPUTS.items()}
    inputs.update(slots=torch.tensor([0, 4, 1]), temperature=torch.full((B,), 0.7), top_p=torch.full((B,), 0.95),
                  top_k=torch.zeros(B, dtype=torch.int32), threshold=torch.full((B,), 0.01),
                  check_temperature=torch.ones(B), student_temperature=torch.full((B,), 0.7),
                  student_top_p=torch.full((B,), 0.95), student_top_k=torch.zeros(B, dtype=torch.int32),
                  proposal_trials=torch.ones(B, dtype=torch.int32))
    kernel_matches_torch(monkeypatch, "rsd_engine.engine.advance_and_pack", advance_and_pack,
                         lambda rows, out: engine._step_and_advance(rows, teacher_kv=64, student_kv=64, out=out),
                         inputs, 4)


def test_a_wrong_output_buffer_is_named(engine):
    inputs, sampled = state(4, engine.space.size, True, seed=1)
    before = {k: v.clone() for k, v in inputs.items()}
    with pytest.raises(ValueError, match=r"output buffer is \(4, 5\), not \[4, 4\]"):
        advance_and_pack(inputs, sampled, engine._teacher_next, engine._teacher_advance, engine.max_batch_size,
                         torch.zeros(4, 5, dtype=torch.float64))
    assert all(torch.equal(inputs[k], before[k]) for k in inputs)  # nothing moved


# ---- a speculative round: kernels/advance.py's round_advance_pack_kernel against SpeculativeDecoder._advance ----

def round_state(B, W, V, draft_tokens, with_slots, seed):
    """Round inputs and a VerifyOutput covering the cases of the commit: runs of every length (0 too), a mapped
    token inside the run (cut after it), after it (ignored), at its first position; flagged (-1) tokens past
    the run and a flagged run; padding rows; rows near max_new_tokens and max_seq_len (num_draft shrinks)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = {name: torch.randint(0, 40, (B,), generator=gen).to(dtype) for name, dtype in STEP_INPUTS.items()}
    inputs["max_new_tokens"] = torch.randint(40, 90, (B,), generator=gen)
    inputs["max_new_tokens"][2] = inputs["steps"][2] + 3  # close to its end: fewer drafts next round
    inputs["student_pos"][3 % B] = 60  # close to max_seq_len (64)
    inputs["teacher_pos"][4 % B] = 61  # the teacher's side closer to it than the student's
    inputs["num_draft"] = torch.full((B,), draft_tokens, dtype=torch.int32)
    inputs["slots"] = torch.tensor([0, 1, 4, 2, 4, 3, 5, 6][:B])  # 4 is the scratch slot here: padding rows
    if not with_slots:
        del inputs["slots"]
    num_emitted = torch.randint(0, W + 1, (B,), generator=gen, dtype=torch.int32)
    num_emitted[0], num_emitted[1] = W, 1
    tokens = torch.randint(0, V, (B, W), generator=gen)
    tokens[torch.arange(W)[None, :] >= num_emitted[:, None]] = -1  # rsd_verify's -1 past the run
    tokens[5 % B, 0] = -2  # a flagged row
    verified = VerifyOutput(tokens, num_emitted, torch.rand(B, W, generator=gen) < 0.5,
                            torch.randn(B, W, generator=gen), torch.randn(B, W, generator=gen))
    return inputs, verified


@pytest.fixture(scope="module")
def speculative(tiny_pair):
    engine = Engine(*tiny_pair, device="cpu", dtype="float32", max_batch_size=4, max_seq_len=64, sampler="reference",
                    draft_tokens=3)
    V = engine.space.size
    engine._teacher_next = (torch.arange(V) * 7) % V
    engine._teacher_advance = torch.arange(V) % 3 + 1
    spec = engine._speculative
    spec.mapped = torch.arange(V) % 5 == 0  # one id in five stands for several teacher tokens
    return spec


@pytest.mark.parametrize("with_slots", [True, False], ids=["slots", "rows-in-order"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_kernel_moves_rows_and_packs_as_the_torch_ops(speculative, with_slots, seed):
    e, G = speculative.engine, speculative.draft_tokens
    W, B = G + 1, 8 if with_slots else 6
    inputs, verified = round_state(B, W, e.space.size, G, with_slots, seed)
    # the cases are there: a run cut at a mapped token before its end, and one whose first token is mapped
    run = torch.arange(W)[None, :] < verified.num_emitted[:, None]
    mapped = speculative.mapped[verified.tokens.clamp_min(0)] & run
    expected_inputs = {k: v.clone() for k, v in inputs.items()}
    speculative._advance(expected_inputs, verified)
    expected = pack_outputs([verified.num_emitted, verified.tokens, verified.accepted, verified.teacher_logprob,
                             verified.student_logprob], torch.zeros(B, 1 + 4 * W, dtype=torch.float64))
    out = torch.full((B, 1 + 4 * W), -7.0, dtype=torch.float64)
    round_advance_and_pack(inputs, verified, speculative.mapped, e._teacher_next, e._teacher_advance,
                           e.max_batch_size, e.max_seq_len, G, out)
    assert torch.equal(out, expected)
    for name in expected_inputs:
        assert torch.equal(inputs[name], expected_inputs[name]), name
    if seed == 0:
        assert mapped.any() and (verified.num_emitted == 0).any()


def test_the_round_takes_one_launch_for_it(speculative, monkeypatch):
    """The captured round (``out`` given) with the kernels forced onto CPU tensors packs through the kernel;
    the packed outputs and the state equal the torch ops'."""
    e, G = speculative.engine, speculative.draft_tokens
    W, B = G + 1, 3
    inputs, _ = round_state(B, W, e.space.size, G, True, seed=4)
    inputs["slots"] = torch.tensor([0, 4, 1])
    for name, value in dict(temperature=0.7, top_p=0.95, top_k=0, threshold=0.01, check_temperature=1.0,
                            student_temperature=0.7, student_top_p=0.95, student_top_k=0, proposal_trials=1).items():
        inputs[name] = torch.full((B,), value, dtype=STEP_INPUTS[name])
    inputs["teacher_tokens"] %= 8
    inputs["student_tokens"] %= 8
    inputs["student_pos"] = inputs["teacher_pos"] = torch.tensor([5, 6, 7])
    inputs["num_draft"] = torch.tensor([3, 2, 3], dtype=torch.int32)
    kernel_matches_torch(monkeypatch, "rsd_engine.speculative.round_advance_and_pack", round_advance_and_pack,
                         lambda rows, out: speculative._round_and_advance(rows, teacher_kv=64, student_kv=64,
                                                                          out=out),
                         inputs, 1 + 4 * W)


def test_a_wrong_round_output_buffer_is_named(speculative):
    e, G = speculative.engine, speculative.draft_tokens
    inputs, verified = round_state(4, G + 1, e.space.size, G, True, seed=1)
    before = {k: v.clone() for k, v in inputs.items()}
    with pytest.raises(ValueError, match=r"round's output buffer is \(4, 16\), not \[4, 17\]"):
        round_advance_and_pack(inputs, verified, speculative.mapped, e._teacher_next, e._teacher_advance,
                               e.max_batch_size, e.max_seq_len, G, torch.zeros(4, 16, dtype=torch.float64))
    assert all(torch.equal(inputs[k], before[k]) for k in inputs)
