"""The decode step (teacher forward, student forward, uniforms, RSD sample) compiles with
fullgraph=True on CPU: the proof that it has no graph breaks and no host syncs (DESIGN.md §6).

Graph breaks and host syncs are found by Dynamo's tracing, whatever the backend; "aot_eager" also
runs AOTAutograd's functionalisation over the custom ops' fake kernels, without inductor's C++
code generation (minutes on two cores)."""
import pytest
import torch

from rsd_engine import Engine, SamplingParams
from rsd_engine.sampling import resolve_backend


def compiled_backends():
    out = ["reference"]
    try:
        resolve_backend("cpp", "cpu")
        out.append("cpp")
    except ValueError:
        pass
    return out


@pytest.mark.parametrize("sampler", compiled_backends())
def test_decode_step_compiles_fullgraph(tiny_pair, sampler):
    torch._dynamo.reset()
    engine = Engine(*tiny_pair, device="cpu", max_batch_size=3, max_seq_len=64, sampler=sampler)
    prompts = ["The answer is", "Let x be", "1 + 1 ="]
    engine.generate_batch(prompts, SamplingParams(max_new_tokens=2, seed=0))  # fills the caches

    from rsd_engine.scheduler import Request
    from rsd_engine.results import GenerationResult

    params = SamplingParams(threshold=0.003, seed=0)
    batch = []
    for slot, p in enumerate(prompts):
        ids = engine.tokenizer.encode(p, add_special_tokens=False)
        r = Request(slot, ids, ids, params, seed=slot, result=GenerationResult(ids))
        r.slot, r.student_len, r.teacher_len = slot, len(ids) - 1, len(ids) - 1
        r.next_student_token = r.next_teacher_token = ids[-1]
        batch.append(r)
    inputs = engine._step_inputs(batch)
    eager = engine.decode_step(*inputs, teacher_kv=16, student_kv=16)
    step = torch.compile(engine.decode_step, fullgraph=True, dynamic=False, backend="aot_eager")
    compiled = step(*inputs, teacher_kv=16, student_kv=16)
    assert torch.equal(eager.token, compiled.token) and torch.equal(eager.accepted, compiled.accepted)
    torch.testing.assert_close(eager.teacher_logprob, compiled.teacher_logprob, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eager.student_logprob, compiled.student_logprob, atol=1e-4, rtol=1e-4)
