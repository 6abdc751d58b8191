"""Generator (single-model generation through the Engine's runtime) against HF transformers' greedy
decoding and log_softmax, the truncated-softmax law, the randomness contract and bad input."""
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from law import chi_square_pvalue, truncate
from rsd_engine import Engine, Generator, SamplingParams
from tiny import build_model
from triton_device import engine_placement

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["The answer is", "Let x be a number such that 2x + 3 = 11. Then", "1 + 1 ="]
ALPHA = 1e-3


@pytest.fixture(scope="module")
def gen(tiny_pair):
    return Generator(tiny_pair[1], device="cpu", dtype="float32", max_batch_size=2, max_seq_len=128,
                     sampler="reference")


@pytest.fixture(scope="module", params=["qwen3", "qwen2", "llama"])
def arch_dir(request, tmp_path_factory, tiny_tokenizer_dir):
    return build_model(tmp_path_factory.mktemp(request.param), request.param, tokenizer_dir=tiny_tokenizer_dir,
                       hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96, seed=4)


def hf_greedy(model, prompt_ids, new_tokens, eos_ids, vocab):
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=new_tokens,
                         eos_token_id=sorted(eos_ids), pad_token_id=0,
                         suppress_tokens=list(range(vocab, model.config.vocab_size)))
    return out[0, len(prompt_ids):].tolist()


def test_greedy_matches_hf(arch_dir):
    gen = Generator(arch_dir, device="cpu", max_batch_size=2, max_seq_len=64, sampler="reference")
    hf = AutoModelForCausalLM.from_pretrained(str(arch_dir), dtype=torch.float32).eval()
    results = gen.generate_batch(PROMPTS, SamplingParams(max_new_tokens=12, temperature=0.0))  # 3 over 2 slots
    for prompt, r in zip(PROMPTS, results):
        ids = gen.tokenizer.encode(prompt, add_special_tokens=False)
        assert r.prompt_token_ids == ids
        assert r.token_ids == hf_greedy(hf, ids, 12, gen.eos_token_ids, len(gen.tokenizer))
        assert r.finish_reason in ("eos", "length") and r.accepted == [] and r.teacher_logprobs == []


def test_score_batch_and_logprobs_match_hf(gen, tiny_pair):
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_pair[1]), dtype=torch.float32).eval()
    r = gen.generate_batch([PROMPTS[1]], SamplingParams(max_new_tokens=10, seed=3))[0]
    completions = [r.token_ids, "x = 4. The answer is \\boxed{4}."]
    scores = gen.score_batch([r.prompt_token_ids, PROMPTS[0]], completions)
    assert r.logprobs == pytest.approx(scores[0], abs=1e-4)  # sampling reports the raw teacher-forced log-prob
    for prompt, completion, got in zip([r.prompt_token_ids, PROMPTS[0]], completions, scores):
        p = prompt if isinstance(prompt, list) else gen.tokenizer.encode(prompt, add_special_tokens=False)
        c = completion if isinstance(completion, list) else gen.tokenizer.encode(completion, add_special_tokens=False)
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([p + c])).logits[0].float(), -1)
        assert got == pytest.approx([lp[len(p) - 1 + j, t].item() for j, t in enumerate(c)], abs=1e-4)


def test_seeded_output_independent_of_batch_size_and_order(tiny_pair, gen):
    prompts = PROMPTS + ["Alice has 5 apples", "The derivative of x^3 is"]
    params = [SamplingParams(max_new_tokens=8 + i, seed=100 + i, top_k=40 * (i % 2), top_p=0.9) for i in range(5)]
    first = gen.generate_batch(prompts, params)
    wide = Generator(tiny_pair[1], device="cpu", max_batch_size=5, max_seq_len=128, sampler="reference")
    order = [4, 2, 0, 3, 1]
    shuffled = wide.generate_batch([prompts[i] for i in order], [params[i] for i in order])
    for i, j in enumerate(order):
        assert shuffled[i].token_ids == first[j].token_ids
        assert shuffled[i].logprobs == pytest.approx(first[j].logprobs, abs=1e-5)
    assert len({tuple(r.token_ids) for r in first}) == len(prompts)


def test_same_draws_as_the_engines_student_fallback(tiny_pair, gen):
    """A Generator over the student draws what an Engine whose proposals are all rejected draws: the same
    uniform (seed, step, draw 0) through the same truncation."""
    engine = Engine(*tiny_pair, device="cpu", max_batch_size=2, max_seq_len=128, sampler="reference")
    rsd = SamplingParams(max_new_tokens=10, threshold=1.0, student_temperature=0.9, student_top_p=0.8, seed=7)
    mine = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.8, seed=7)
    for want, got in zip(engine.generate_batch(PROMPTS, rsd), gen.generate_batch(PROMPTS, mine)):
        assert not any(want.accepted)
        assert got.token_ids == want.token_ids
        assert got.logprobs == pytest.approx(want.student_logprobs, abs=1e-5)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 20, 1.0)])
def test_first_token_follows_the_truncated_softmax(tiny_pair, temperature, top_k, top_p):
    gen = Generator(tiny_pair[1], device="cpu", max_batch_size=64, max_seq_len=32, sampler="reference")
    prompt = gen.tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    n = 3000
    params = [SamplingParams(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, seed=s)
              for s in range(n)]
    samples = np.array([r.token_ids[0] for r in gen.generate_batch([prompt] * n, params)])
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_pair[1]), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, -1].numpy()
    law = truncate(logits, temperature, top_k, top_p, mask=np.arange(len(logits)) < len(gen.tokenizer))
    assert chi_square_pvalue(samples, law) > ALPHA


def test_rsd_only_params_are_refused(gen):
    with pytest.raises(ValueError, match=r"prompt 1 set threshold=0\.5, proposal_trials=2: RSD-only fields"):
        gen.generate_batch(PROMPTS[:2], [SamplingParams(), SamplingParams(threshold=0.5, proposal_trials=2)])


def test_bad_prompts_and_pairs_are_named(gen):
    with pytest.raises(ValueError, match=r"prompt 0 has 200 tokens but max_seq_len is 128"):
        gen.generate_batch([[6] * 200], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        gen.generate_batch([""], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="2 prompts and 1 completions"):
        gen.score_batch(PROMPTS[:2], ["x"])
    with pytest.raises(ValueError, match="prompt 0 with its completion has 201 tokens, more than max_seq_len 128"):
        gen.score_batch([[5]], [[6] * 200])
    rows = gen.model.config.vocab_size
    for bad in (rows, -1):  # not an IndexError from inside the embedding
        with pytest.raises(ValueError, match=rf"prompt 0: token 1 \(id {bad}\) is outside the model's vocabulary"):
            gen.generate_batch([[5, bad]], SamplingParams(max_new_tokens=2))
        with pytest.raises(ValueError, match=rf"completion 0: token 0 \(id {bad}\) is outside the model's vocabulary"):
            gen.score_batch([[5]], [[bad]])
    with pytest.raises(TypeError, match="completion 0 must be a string or a list of token ids, got NoneType"):
        gen.score_batch([[5]], [None])


def test_nonfinite_logits_end_that_request_alone(tiny_pair, monkeypatch):
    gen = Generator(tiny_pair[1], device="cpu", max_batch_size=2, max_seq_len=64, sampler="reference")
    real = gen.model.logits
    calls = {"n": 0}

    def broken(hidden):
        calls["n"] += 1
        out = real(hidden)
        if calls["n"] == 3:
            out[0] = float("nan")  # row 0 only, at the third step
        return out

    monkeypatch.setattr(gen.model, "logits", broken)
    bad, good = gen.generate_batch(PROMPTS[:2], SamplingParams(max_new_tokens=6, seed=1, ignore_eos=True))
    assert bad.finish_reason == "error" and "NaN or +inf logits at generation step 2 of prompt 0" in bad.error
    assert good.finish_reason == "length" and len(good.token_ids) == 6


@pytest.mark.parametrize("sampler", ["auto", "cpp", "triton"])
def test_every_backend_gives_the_reference_tokens(tiny_pair, gen, sampler):
    """Seeded and greedy generations are token for token the reference's on every sample_tokens backend
    ("auto" picks one that has the kernel)."""
    try:
        other = Generator(tiny_pair[1], max_batch_size=2, max_seq_len=128, sampler=sampler, **engine_placement(sampler))
    except ValueError as e:
        pytest.skip(str(e))
    for params in (SamplingParams(max_new_tokens=6, top_k=30, seed=2), SamplingParams(max_new_tokens=6, temperature=0)):
        for want, got in zip(gen.generate_batch(PROMPTS, params), other.generate_batch(PROMPTS, params)):
            assert got.token_ids == want.token_ids
            assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)


def test_decode_step_compiles_fullgraph(gen):
    """One forward, the uniforms and the sample op trace without graph breaks or host syncs."""
    torch._dynamo.reset()
    gen.generate_batch(PROMPTS[:2], SamplingParams(max_new_tokens=2, seed=0))
    inputs = {name: t for name, t in gen._step_inputs(gen_batch(gen), with_slots=True).items()}
    eager = gen.decode_step(inputs, student_kv=16)
    step = torch.compile(gen.decode_step, fullgraph=True, dynamic=False, backend="aot_eager")
    got = step(inputs, student_kv=16)
    assert torch.equal(got[0], eager[0])
    torch.testing.assert_close(got[1], eager[1], atol=1e-4, rtol=1e-4)


def gen_batch(gen):
    from rsd_engine.results import GenerationResult
    from rsd_engine.scheduler import Request

    batch = []
    for slot, prompt in enumerate(PROMPTS[:2]):
        ids = gen.tokenizer.encode(prompt, add_special_tokens=False)
        r = Request(slot, ids, [], SamplingParams(seed=slot), seed=slot, result=GenerationResult(ids))
        r.slot, r.student_len, r.next_student_token = slot, len(ids) - 1, ids[-1]
        batch.append(r)
    return batch
