"""The decode step (teacher forward, student forward, uniforms, RSD sample) compiles with
fullgraph=True on CPU: the proof that it has no graph breaks and no host syncs (DESIGN.md §6).

Graph breaks and host syncs are found by Dynamo's tracing, whatever the backend; "aot_eager" also
runs AOTAutograd's functionalisation over the custom ops' fake kernels, without inductor's C++
code generation (minutes on two cores)."""
import pytest
import torch

from rsd_engine import Engine, SamplingParams
from rsd_engine.results import GenerationResult
from rsd_engine.sampling import resolve_backend
from rsd_engine.scheduler import Request

PROMPTS = ["The answer is", "Let x be", "1 + 1 ="]


def compiled_backends():
    out = ["reference"]
    try:
        resolve_backend("cpp", "cpu")
        out.append("cpp")
    except ValueError:
        pass
    return out


def decode_batch(engine):
    """Requests at their first decode step, with the caches filled by a short generation."""
    engine.generate_batch(PROMPTS, SamplingParams(max_new_tokens=2, seed=0))
    params = SamplingParams(threshold=0.003, seed=0)
    batch = []
    for slot, prompt in enumerate(PROMPTS):
        ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
        r = Request(slot, ids, ids, params, seed=slot, result=GenerationResult(ids))
        r.slot, r.student_len, r.teacher_len = slot, len(ids) - 1, len(ids) - 1
        r.next_student_token = r.next_teacher_token = ids[-1]
        batch.append(r)
    return batch


def assert_same(a, b):
    assert torch.equal(a.token, b.token) and torch.equal(a.accepted, b.accepted)
    torch.testing.assert_close(a.teacher_logprob, b.teacher_logprob, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.student_logprob, b.student_logprob, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sampler", compiled_backends())
def test_decode_step_compiles_fullgraph(tiny_pair, sampler):
    torch._dynamo.reset()
    engine = Engine(*tiny_pair, device="cpu", max_batch_size=3, max_seq_len=64, sampler=sampler)
    inputs = engine._step_inputs(decode_batch(engine), with_slots=True)
    eager = engine.decode_step(inputs, teacher_kv=16, student_kv=16)
    step = torch.compile(engine.decode_step, fullgraph=True, dynamic=False, backend="aot_eager")
    assert_same(eager, step(inputs, teacher_kv=16, student_kv=16))


def test_graph_runner_plumbing_on_cpu(tiny_pair):
    """The self-feeding graph runner, capture off (CPU): capturing leaves the state's rows alone; a run
    writes the eager step's outputs to state.out and moves the rows on as the host's commit would."""
    engine = Engine(*tiny_pair, device="cpu", max_batch_size=3, max_seq_len=64, sampler="reference")
    batch = decode_batch(engine)
    inputs = engine._step_inputs(batch, with_slots=True)
    eager = engine.decode_step(inputs, teacher_kv=64, student_kv=64)
    state = engine._state
    assert state.sync(batch)
    before = {name: t.clone() for name, t in state.inputs(3).items()}
    runner = engine._capture(64)
    assert not runner.enabled and runner.buckets == [1, 2, 3]
    assert all(torch.equal(before[name], t) for name, t in state.inputs(3).items())
    assert runner(3) == 3
    out = state.out[:3]
    assert_same(eager, type(eager)(out[:, 0].long(), out[:, 1].bool(), out[:, 2].float(), out[:, 3].float()))
    after = state.inputs(3)
    assert torch.equal(after["student_tokens"], eager.token) and torch.equal(after["teacher_tokens"], eager.token)
    for name in ("student_pos", "teacher_pos", "steps"):
        assert torch.equal(after[name], before[name] + 1)
