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
    """The CUDA-graph runner's inputs, padding and buckets, exercised with capture off (CPU)."""
    engine = Engine(*tiny_pair, device="cpu", max_batch_size=3, max_seq_len=64, sampler="reference")
    batch = decode_batch(engine)
    runner = engine._capture(64)
    assert not runner.enabled and runner.buckets == [1, 2, 3]
    inputs = engine._step_inputs(batch, with_slots=True)
    assert_same(engine.decode_step(inputs, teacher_kv=64, student_kv=64), runner(inputs))
