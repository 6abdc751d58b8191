"""Engine.generate_batch / score_batch against HF transformers, and the scheduling contract."""
import re

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from rsd_engine import Engine, SamplingParams
from triton_device import engine_placement

PROMPTS = ["The answer is", "Let x be a number such that 2x + 3 = 11. Then", "1 + 1 ="]
GREEDY = dict(temperature=0.0, student_temperature=0.0)


@pytest.fixture(scope="module")
def engine(tiny_pair):
    return Engine(*tiny_pair, device="cpu", dtype="float32", max_batch_size=2, max_seq_len=128, sampler="reference")


@pytest.fixture(scope="module")
def hf_models(tiny_pair):
    return [AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in tiny_pair]


def hf_greedy(model, engine, prompt_ids, new_tokens):
    vocab = len(engine.tokenizer)
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=new_tokens,
                         eos_token_id=sorted(engine.eos_token_ids), pad_token_id=0,
                         suppress_tokens=list(range(vocab, model.config.vocab_size)))
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("threshold,which", [(0.0, 0), (1.0, 1)], ids=["teacher", "student"])
def test_greedy_matches_hf(engine, hf_models, threshold, which):
    """threshold 0 keeps every teacher proposal; threshold 1 rejects them all: greedy decoding of one model."""
    params = SamplingParams(max_new_tokens=12, threshold=threshold, **GREEDY)
    results = engine.generate_batch(PROMPTS, params)  # 3 prompts over 2 slots
    for prompt, result in zip(PROMPTS, results):
        ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
        assert result.prompt_token_ids == ids
        assert result.token_ids == hf_greedy(hf_models[which], engine, ids, 12)
        assert all(a == (threshold == 0.0) for a in result.accepted)
        assert result.acceptance_rate == (1.0 if threshold == 0.0 else 0.0)


def test_score_batch_matches_hf(engine, hf_models):
    completions = ["x = 4. The answer is \\boxed{4}.", [5, 17, 200, 3]]
    scores = engine.score_batch(PROMPTS[:2], completions)
    for prompt, completion, score in zip(PROMPTS, completions, scores):
        p = engine.tokenizer.encode(prompt, add_special_tokens=False)
        c = engine.tokenizer.encode(completion, add_special_tokens=False) if isinstance(completion, str) else completion
        ids = torch.tensor([p + c])
        for model, got in zip(hf_models, (score.teacher_logprobs, score.student_logprobs)):
            lp = torch.log_softmax(model(ids).logits[0].float(), -1)
            want = [lp[len(p) - 1 + j, tok].item() for j, tok in enumerate(c)]
            assert got == pytest.approx(want, abs=1e-4)


def test_generation_logprobs_match_teacher_forcing(engine):
    params = SamplingParams(max_new_tokens=16, threshold=0.003, seed=11)
    result = engine.generate_batch([PROMPTS[1]], params)[0]
    score = engine.score_batch([result.prompt_token_ids], [result.token_ids])[0]
    assert result.teacher_logprobs == pytest.approx(score.teacher_logprobs, abs=1e-4)
    assert result.student_logprobs == pytest.approx(score.student_logprobs, abs=1e-4)


def test_numpy_token_ids_are_token_ids(engine):
    """Token ids from numpy (an array's elements, as a tokenizer's return_tensors="np" gives them) are ids: the same
    trace and scores as Python's ints (SamplingParams takes numpy's numbers too); a float among them is named."""
    params = SamplingParams(max_new_tokens=8, seed=3)
    result = engine.generate_batch([PROMPTS[0]], params)[0]
    prompt, completion = result.prompt_token_ids, result.token_ids
    again = engine.generate_batch([list(np.asarray(prompt, dtype=np.int64))], params)[0]
    assert again.token_ids == completion and type(again.prompt_token_ids[0]) is int
    scored = engine.score_batch([prompt], [completion])[0]
    from_numpy = engine.score_batch([tuple(np.asarray(prompt, dtype=np.int32))], [list(np.asarray(completion))])[0]
    assert from_numpy.teacher_logprobs == scored.teacher_logprobs
    with pytest.raises(TypeError, match=r"prompt 0 must be .*, got a list holding a float64 \(np.float64\(1.0\)\)"):
        engine.generate_batch([[np.float64(1.0)]], params)


def test_numpy_sizes_are_sizes(tiny_pair):
    """max_batch_size, max_seq_len and draft_tokens from numpy (a sweep's np.arange, a config read with numpy) are
    sizes, kept as Python ints; they were refused as "must be an integer". numpy's bool is still not a size."""
    engine = Engine(*tiny_pair, device="cpu", dtype="float32", max_batch_size=np.int64(2), max_seq_len=np.int32(64),
                    draft_tokens=np.int64(2), sampler="reference")
    assert (engine.max_batch_size, engine.max_seq_len, engine.draft_tokens) == (2, 64, 2)
    assert all(type(v) is int for v in (engine.max_batch_size, engine.max_seq_len, engine.draft_tokens))
    assert type(engine.teacher_cache.max_seq_len) is int and type(engine.student_cache.num_slots) is int
    assert len(engine.generate_batch(PROMPTS[:1], SamplingParams(max_new_tokens=4))[0].token_ids) == 4
    with pytest.raises(ValueError, match=r"max_batch_size = np.True_: must be an integer in \[1, "):
        Engine(*tiny_pair, device="cpu", max_batch_size=np.bool_(True))


def test_numpy_sizes_in_the_pipelines_options_are_kept_as_ints():
    """The options take numpy sizes too, kept as Python ints: kept as numpy, they reached the run's manifest and
    json.dumps failed (TypeError: Object of type int64 is not JSON serializable)."""
    from rsd_engine.pipeline.evaluate import EvalOptions
    from rsd_engine.pipeline.generate import GenerateOptions
    from rsd_engine.pipeline.provenance import ProvenanceOptions
    from rsd_engine.pipeline.select import SelectOptions

    pair = dict(teacher="t", student="s", data="d", out="o")
    for options, field in ((GenerateOptions(**pair, max_batch_size=np.int64(4)), "max_batch_size"),
                           (GenerateOptions(**pair, max_seq_len=np.int32(64)), "max_seq_len"),
                           (EvalOptions(model="m", data="d", out="o", max_batch_size=np.int64(4)), "max_batch_size"),
                           (ProvenanceOptions(**pair, batch_size=np.int64(4)), "batch_size"),
                           (SelectOptions(**pair, batch_size=np.int64(4), max_seq_len=np.int64(64)), "max_seq_len")):
        assert type(getattr(options, field)) is int, (type(options).__name__, field)


def test_seeded_output_independent_of_batch(tiny_pair, engine):
    prompts = PROMPTS + ["Alice has 5 apples", "The derivative of x^3 is"]
    params = [SamplingParams(max_new_tokens=10 + i, threshold=0.003, seed=100 + i) for i in range(len(prompts))]
    first = engine.generate_batch(prompts, params)
    again = engine.generate_batch(prompts, params)
    wide = Engine(*tiny_pair, device="cpu", max_batch_size=5, max_seq_len=128, sampler="reference")
    order = [4, 2, 0, 3, 1]
    shuffled = wide.generate_batch([prompts[i] for i in order], [params[i] for i in order])
    for i, j in enumerate(order):
        assert shuffled[i].token_ids == first[j].token_ids == again[j].token_ids
        assert shuffled[i].accepted == first[j].accepted
    assert len({tuple(r.token_ids) for r in first}) == len(prompts)
    assert any(a for r in first for a in r.accepted) and not all(a for r in first for a in r.accepted)


def test_more_prompts_than_slots_all_finish_in_order(engine):
    prompts = [[7 + i] * (1 + 3 * i) for i in range(7)]  # lengths 1 .. 19, token-id prompts
    params = [SamplingParams(max_new_tokens=3 + 2 * i, seed=i, threshold=0.0) for i in range(7)]
    results = engine.generate_batch(prompts, params)
    for i, r in enumerate(results):
        assert r.prompt_token_ids == prompts[i]
        assert r.finish_reason in ("eos", "length")
        assert len(r.token_ids) == 3 + 2 * i or r.finish_reason == "eos"
        assert len(r.accepted) == len(r.teacher_logprobs) == len(r.student_logprobs) == len(r.token_ids)


def test_stops(engine):
    base = engine.generate_batch([PROMPTS[0]], SamplingParams(max_new_tokens=12, **GREEDY, threshold=0.0))[0]
    stop_id = base.token_ids[4]
    first = base.token_ids.index(stop_id)
    by_id = engine.generate_batch([PROMPTS[0]], SamplingParams(max_new_tokens=12, **GREEDY, threshold=0.0,
                                                               stop_token_ids=[stop_id]))[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == base.token_ids[: first + 1]
    # A stop id is no EOS: its text is kept, as its id is.
    assert by_id.text == engine.tokenizer.decode(by_id.token_ids, skip_special_tokens=False)
    text = base.text
    needle = text[len(text) // 2: len(text) // 2 + 2]
    by_text = engine.generate_batch([PROMPTS[0]], SamplingParams(max_new_tokens=12, **GREEDY, threshold=0.0,
                                                                 stop=[needle]))[0]
    assert by_text.finish_reason == "stop" and by_text.text == text[: text.index(needle)]


def test_stop_string_at_the_start_leaves_no_text(engine):
    base = engine.generate_batch([PROMPTS[0]], SamplingParams(max_new_tokens=4, **GREEDY, threshold=0.0))[0]
    first = engine.tokenizer.decode(base.token_ids[:1])
    cut = engine.generate_batch([PROMPTS[0]], SamplingParams(max_new_tokens=4, **GREEDY, threshold=0.0,
                                                             stop=[first]))[0]
    assert (cut.finish_reason, cut.token_ids, cut.text) == ("stop", base.token_ids[:1], "")


def test_the_earliest_of_several_stop_strings_cuts_the_text(engine):
    """Two stop strings that one token completes together: the text ends before the one that starts first, whatever
    their order in ``stop``."""
    ids = engine.tokenizer.encode("The answer is 42", add_special_tokens=False)
    assert engine.tokenizer.decode(ids[:2]) == "The answer"  # " answer" completes both stop strings at once
    r = engine._make_requests(["The"], SamplingParams(max_new_tokens=20, stop=["swer", " an"]))[0]
    for token in ids:  # one token per step, as plain decoding commits them
        if engine._commit([r], [[(token, 1.0, 0.0, 0.0)]]):
            break
    assert (r.result.finish_reason, r.result.token_ids, r.result.text) == ("stop", ids[:2], "The")


@pytest.mark.parametrize("stop,text", [("€", "ab"), ("b€", "a"), ("€c", "ab")])
def test_stop_string_ending_in_a_character_of_several_tokens(engine, stop, text):
    """Byte-level tokens spell "€" in three: until its last byte the text ends in U+FFFD, which must not
    count as searched (the stop string is found once the character is whole)."""
    ids = engine.tokenizer.encode("ab€cd", add_special_tokens=False)
    assert len(ids) > 4  # € is split into bytes
    r = engine._make_requests(["The"], SamplingParams(max_new_tokens=20, stop=[stop]))[0]
    for token in ids:  # one token per step, as plain decoding commits them
        if engine._commit([r], [[(token, 1.0, 0.0, 0.0)]]):
            break
    assert (r.result.finish_reason, r.result.text) == ("stop", text)


def test_cache_limit_finishes_with_length(tiny_pair):
    small = Engine(*tiny_pair, device="cpu", max_batch_size=2, max_seq_len=12, sampler="reference")
    r = small.generate_batch([[5, 6, 7, 8, 9]], SamplingParams(max_new_tokens=100, threshold=0.0, **GREEDY))[0]
    assert r.finish_reason in ("length", "eos") and len(r.prompt_token_ids) + len(r.token_ids) <= 12


@pytest.mark.parametrize("kind", ["plain", "speculative", "generator"])
def test_a_sequence_that_nothing_else_stops_holds_exactly_max_seq_len_tokens(tiny_pair, kind):
    """Prompt and generated tokens together hold at most max_seq_len tokens, and a request that no EOS, stop or
    max_new_tokens ends runs to exactly that many: its last token is written, never read, so it needs no cache
    position (the check above allowed ending a token or more early)."""
    from rsd_engine import Generator

    prompt = [5, 6, 7, 8, 9]
    for max_seq_len in (7, 12, 13):
        model = (Generator(tiny_pair[1], device="cpu", max_batch_size=1, max_seq_len=max_seq_len, sampler="reference")
                 if kind == "generator" else
                 Engine(*tiny_pair, device="cpu", max_batch_size=1, max_seq_len=max_seq_len, sampler="reference",
                        draft_tokens=3 if kind == "speculative" else 0))
        r = model.generate_batch([prompt], SamplingParams(max_new_tokens=100, threshold=0.01, seed=1,
                                                          ignore_eos=True))[0]
        assert (r.finish_reason, len(prompt) + len(r.token_ids)) == ("length", max_seq_len), max_seq_len


def test_max_seq_len_past_a_models_context_warns(tiny_pair, recwarn):
    """The tiny models were trained (configured) for 2048 positions: a cache longer than that lets sequences
    run where the models' tokens and log-probs mean nothing, which the user should hear about once."""
    from rsd_engine import Generator

    Engine(*tiny_pair, device="cpu", max_batch_size=1, max_seq_len=2048, sampler="reference")
    Generator(tiny_pair[1], device="cpu", max_batch_size=1, max_seq_len=2048, sampler="reference")
    assert not [w for w in recwarn if "context" in str(w.message)]
    with pytest.warns(UserWarning, match=r"max_seq_len = 4096 is past the teacher's context \(2048 positions") as got:
        Engine(*tiny_pair, device="cpu", max_batch_size=1, max_seq_len=4096, sampler="reference")
    assert any("student's context" in str(w.message) for w in got)
    with pytest.warns(UserWarning, match=r"past the model's context \(2048 positions.*--max-seq-len"):
        Generator(tiny_pair[1], device="cpu", max_batch_size=1, max_seq_len=2049, sampler="reference")


def test_prompt_longer_than_max_seq_len_is_named(engine):
    with pytest.raises(ValueError, match=r"prompt 1 has 200 tokens .* max_seq_len is 128"):
        engine.generate_batch([[5], [6] * 200], SamplingParams(max_new_tokens=2))


def test_empty_prompt_is_refused(engine):
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate_batch([""], SamplingParams(max_new_tokens=2))


def test_params_must_pair_with_prompts(engine):
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        engine.generate_batch(PROMPTS, [SamplingParams()] * 2)
    with pytest.raises(TypeError, match="list of strings"):
        engine.generate_batch("one string", SamplingParams())


@pytest.mark.parametrize("model", ["teacher", "student"])
def test_nonfinite_row_fails_alone(tiny_pair, model, monkeypatch):
    """A row whose logits turn NaN finishes with finish_reason "error" and a message; the other rows
    of the batch decode exactly the tokens they decode without it."""
    eng = Engine(*tiny_pair, device="cpu", max_batch_size=3, max_seq_len=64, sampler="reference")
    params = SamplingParams(max_new_tokens=8, threshold=0.05, seed=3, ignore_eos=True)
    alone = eng.generate_batch([PROMPTS[0], PROMPTS[2]], params)

    net = getattr(eng, model)
    real, calls = net.logits, {"n": 0}

    def broken(hidden):  # from the 4th decode step on, the middle row (prompt 1, slot 1) is NaN
        calls["n"] += 1
        out = real(hidden)
        if calls["n"] >= 4 and out.shape[0] == 3:
            out[1] = float("nan")
        return out

    monkeypatch.setattr(net, "logits", broken)
    results = eng.generate_batch(PROMPTS, params)
    bad = results[1]
    assert bad.finish_reason == "error" and len(bad.token_ids) == 3
    assert bad.error.startswith(f"the {model}'s logits hold NaN or +inf") and " at generation step 3 of prompt 1" \
        in bad.error
    for want, got in zip(alone, (results[0], results[2])):
        assert got.token_ids == want.token_ids and got.accepted == want.accepted
        assert got.finish_reason == "length" and got.error == ""


def test_ignore_eos_runs_to_max_new_tokens(engine):
    params = SamplingParams(max_new_tokens=30, threshold=0.0, seed=5, ignore_eos=True)
    results = engine.generate_batch(PROMPTS, params)
    assert all(len(r.token_ids) == 30 and r.finish_reason == "length" for r in results)


def test_a_written_eos_ends_the_request_unless_ignore_eos(engine, monkeypatch):
    """The student made to write its EOS at every step: the request ends on it ("eos"; the EOS is in token_ids, not
    in text), or with ignore_eos runs on past it to max_new_tokens. Sampled, the tiny models seldom write an EOS:
    the test above passes as well without ignore_eos."""
    eos = engine.tokenizer.eos_token_id
    real = engine.student.logits
    monkeypatch.setattr(engine.student, "logits", lambda hidden: real(hidden).index_fill(-1, torch.tensor([eos]), 1e4))
    ended, ignored = (engine.generate_batch([PROMPTS[0]], SamplingParams(max_new_tokens=5, threshold=1.0,
                                                                         ignore_eos=flag, **GREEDY))[0]
                      for flag in (False, True))
    assert (ended.finish_reason, ended.token_ids, ended.text) == ("eos", [eos], "")
    assert (ignored.finish_reason, ignored.token_ids) == ("length", [eos] * 5)
    assert ignored.text == engine.tokenizer.decode([eos] * 5, skip_special_tokens=False) != ""


@pytest.mark.parametrize("draft_tokens", [0, 3])
def test_a_long_prompt_over_prefill_chunks_and_kv_buckets_matches_teacher_forcing(tiny_pair, draft_tokens):
    """A prompt longer than PREFILL_CHUNK is prefilled in chunks, and its generation crosses a KV_BUCKET boundary
    (the attention span a step passes grows there): every step's log-probs are teacher forcing's. The other tests'
    sequences stay inside one chunk and one bucket."""
    from rsd_engine.engine import PREFILL_CHUNK
    from rsd_engine.runtime import KV_BUCKET

    eng = Engine(*tiny_pair, device="cpu", max_batch_size=2, max_seq_len=PREFILL_CHUNK + 2 * KV_BUCKET,
                 sampler="reference", draft_tokens=draft_tokens)
    text = " ".join(PROMPTS) + " The derivative of x^3 is 3x^2, and the integral of 2x is x^2 + C. "
    ids = eng.tokenizer.encode(text * 60, add_special_tokens=False)
    # Crosses the bucket boundary past the first chunk; the shorter row's stays in the middle of its bucket.
    long, short = ids[: PREFILL_CHUNK + KV_BUCKET - 6], ids[: KV_BUCKET + 40]
    params = SamplingParams(max_new_tokens=12, threshold=0.01, seed=2, ignore_eos=True)
    results = eng.generate_batch([long, short], params)
    scores = eng.score_batch([r.prompt_token_ids for r in results], [r.token_ids for r in results])
    for result, score in zip(results, scores):
        assert len(result.token_ids) == 12
        assert result.teacher_logprobs == pytest.approx(score.teacher_logprobs, abs=1e-4)
        assert result.student_logprobs == pytest.approx(score.student_logprobs, abs=1e-4)


def test_a_top_k_past_int32_keeps_every_id(engine):
    """The step's int32 fields came to the device by a cast that wraps: top_k = 2**32 + 1 (no upper bound in
    SamplingParams) became 1, greedy. Clamped, as the samplers clamp it: past the vocabulary, every id."""
    # The teacher's proposals all kept (threshold 0), or all refused and the student's fallback drawn (1).
    for field, threshold in (("top_k", 0.0), ("student_top_k", 1.0)):
        base = dict(max_new_tokens=12, threshold=threshold, temperature=3.0, student_temperature=3.0, seed=5)
        wide = engine.generate_batch(PROMPTS, SamplingParams(**base, **{field: 2**32 + 1}))
        off = engine.generate_batch(PROMPTS, SamplingParams(**base, **{field: 0}))
        greedy = engine.generate_batch(PROMPTS, SamplingParams(**base, **{field: 1}))
        assert [r.token_ids for r in wide] == [r.token_ids for r in off]
        assert [r.token_ids for r in off] != [r.token_ids for r in greedy]  # the case tells them apart


@pytest.mark.parametrize("sampler", ["cpp", "triton"])
def test_every_backend_gives_the_reference_outputs(tiny_pair, engine, sampler):
    """Greedy and seeded generations are token for token the same on every sampler backend."""
    other = Engine(*tiny_pair, max_batch_size=2, max_seq_len=128, sampler=sampler, **engine_placement(sampler))
    assert other.sampler == sampler
    for params in (SamplingParams(max_new_tokens=6, threshold=0.5, **GREEDY),
                   SamplingParams(max_new_tokens=6, threshold=0.003, top_k=50, proposal_trials=2, seed=9)):
        want = engine.generate_batch(PROMPTS, params)
        got = other.generate_batch(PROMPTS, params)
        for w, g in zip(want, got):
            assert g.token_ids == w.token_ids and g.accepted == w.accepted
            assert g.teacher_logprobs == pytest.approx(w.teacher_logprobs, abs=1e-4)


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_batch_size=0), "max_batch_size = 0"),
    (dict(max_batch_size=True), "max_batch_size = True"),
    (dict(max_seq_len=1), "max_seq_len = 1"),
    (dict(max_seq_len=10**19), "max_seq_len = 10000000000000000000: must be an integer in [2, 2147483647]"),
    (dict(max_batch_size=10**19), "max_batch_size = 10000000000000000000: must be an integer in [1, 2147483647]"),
    (dict(device="tpu:0"), "device='tpu:0'"),
    (dict(dtype="int8"), "dtype='int8' is not supported"),
    (dict(sampler="fast"), "sampler='fast' is not a backend"),
])
def test_bad_engine_arguments_are_named(tiny_pair, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Engine(*tiny_pair, **kwargs)


def test_the_sampler_resolves_by_device():
    """resolve_backend (sampling/__init__.py): "auto" is the fused backend of the device (C++ on the CPU where
    rsd_engine._C is built, Triton on CUDA where triton imports), else the reference; an explicit "cpp" needs the
    CPU. A device here is only a name: nothing runs on it, so the CUDA cases need no GPU."""
    from rsd_engine.sampling import _cpp_available, _triton_available, resolve_backend

    assert resolve_backend("auto", "cpu") == ("cpp" if _cpp_available() else "reference")
    assert resolve_backend("auto", "cuda:0") == ("triton" if _triton_available() else "reference")
    assert resolve_backend("auto", "meta") == "reference"
    assert resolve_backend("reference", "cuda") == "reference"
    with pytest.raises(ValueError, match="sampler='cpp' needs device='cpu'"):
        resolve_backend("cpp", "cuda:0")


def test_bad_params_and_score_pairs_are_named(engine):
    with pytest.raises(TypeError, match=r"params\[1\] is a dict, not a SamplingParams"):
        engine.generate_batch(PROMPTS[:2], [SamplingParams(), {"temperature": 0}])
    # One dict of settings was iterated as its keys: "params[0] is a str".
    with pytest.raises(TypeError, match=r"params must be a SamplingParams or a list of them .one per prompt., got "
                                        r"dict: e.g. SamplingParams\(\*\*settings\)"):
        engine.generate_batch(PROMPTS[:1], {"max_new_tokens": 3})
    with pytest.raises(ValueError, match="2 prompts and 1 completions"):
        engine.score_batch(PROMPTS[:2], ["x"])
    with pytest.raises(TypeError, match="prompt 0 must be a string, a list of token ids or a list of chat messages"):
        engine.generate_batch([3.5], SamplingParams(max_new_tokens=2))
    rows = engine.space.size
    for completion, error, message in [
            ([1.0, 2.0], TypeError, r"completion 1 must be a string or a list of token ids, got a list holding a float"),
            (None, TypeError, "completion 1 must be a string or a list of token ids, got NoneType"),
            (5, TypeError, "completion 1 must be a string or a list of token ids, got int"),
            ([True, 3], TypeError, "got a list holding a bool"),
            ([1, rows], ValueError, rf"completion 1: token 1 \(id {rows}\) has no equivalent .* \[0, {rows}\)"),
            ([-1], ValueError, r"completion 1: token 0 \(id -1\) has no equivalent")]:
        with pytest.raises(error, match=message):
            engine.score_batch(PROMPTS[:2], ["x", completion])


def test_text_that_is_not_unicode_is_named(engine):
    """A lone surrogate (a JSON escape, a non-UTF-8 byte from the shell): the tokenizer raised a TypeError naming
    no prompt."""
    params = SamplingParams(max_new_tokens=2)
    with pytest.raises(ValueError, match=r"^prompt 1 is not valid Unicode: '\\ud800' at character 4 is a lone"):
        engine.generate_batch(["fine", "bad \ud800"], params)
    chat = [{"role": "user", "content": "hi \udcff"}]
    with pytest.raises(ValueError, match=r"^prompt 0\[0\]\['content'\] is not valid Unicode: '\\udcff'"):
        engine.generate_batch([chat], params)
    with pytest.raises(ValueError, match=r"^completion 1 is not valid Unicode: '\\udfff' at character 0"):
        engine.score_batch(PROMPTS[:2], ["x", "\udfff"])


CHAT = [{"role": "system", "content": "Think step by step."}, {"role": "user", "content": "What is 1 + 1?"}]


def test_chat_message_prompts_are_the_templated_string(engine):
    """Chat messages go through the student's chat template with the generation prompt, exactly as
    `rsd generate` builds its prompts (pipeline/prompts.py); generation and scoring see the same ids."""
    from rsd_engine.pipeline.prompts import build_prompt

    text = engine.tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == build_prompt(engine.tokenizer, "What is 1 + 1?", "Think step by step.").text
    params = SamplingParams(max_new_tokens=6, seed=4)
    by_chat, by_text = engine.generate_batch([CHAT, text], params)
    assert by_chat.prompt_token_ids == engine.tokenizer.encode(text, add_special_tokens=False)
    assert by_chat.token_ids == by_text.token_ids and by_chat.accepted == by_text.accepted
    chat_score, text_score = engine.score_batch([CHAT, text], [" 2", " 2"])
    assert chat_score == text_score


@pytest.mark.parametrize("prompts,error,message", [
    ([CHAT + [{"role": "assistant", "content": "2"}]], ValueError, "prompt 0 ends with an assistant message"),
    ([[{"role": "user"}]], ValueError, "prompt 0: message 0 must be a dict with string 'role' and 'content'"),
    (CHAT, TypeError, "prompts is one conversation"),
])
def test_bad_chat_prompts_are_named(engine, prompts, error, message):
    with pytest.raises(error, match=message):
        engine.generate_batch(prompts, SamplingParams(max_new_tokens=2))


def test_chat_prompt_without_a_chat_template_is_refused(engine, monkeypatch):
    monkeypatch.setattr(engine.tokenizer, "chat_template", None)
    with pytest.raises(ValueError, match="prompt 0 is chat messages but the student's tokenizer has no chat template"):
        engine.generate_batch([CHAT], SamplingParams(max_new_tokens=2))


def test_a_chat_template_that_fails_names_the_prompt(engine, monkeypatch):
    """A template that raises on one prompt's messages said not which of the batch's prompts it was (the commands
    name the row's id): the prompt's index is named, by generate_batch and score_batch alike."""
    from rsd_engine.pipeline.prompts import ChatTemplateError

    template = ("{% for m in messages %}{% if 'boom' in m.content %}{{ raise_exception('bad content') }}{% endif %}"
                "{% endfor %}" + engine.tokenizer.chat_template)
    monkeypatch.setattr(engine.tokenizer, "chat_template", template)
    boom = [{"role": "user", "content": "boom"}]
    message = rf"^the chat template of {re.escape(str(engine.tokenizer.name_or_path))} fails on prompt 1: bad content$"
    with pytest.raises(ChatTemplateError, match=message):
        engine.generate_batch([CHAT, boom], SamplingParams(max_new_tokens=2))
    with pytest.raises(ChatTemplateError, match=message):
        engine.score_batch([CHAT, boom], [" 2", " 2"])


@pytest.mark.parametrize("kind", ["engine", "generator"])
def test_nothing_else_uses_the_caches_while_a_generate_iter_is_paused(tiny_pair, kind):
    """score_batch (or a second stream) would overwrite the paused stream's rows in flight: refused until the
    iterator is exhausted or closed, and the stream then finishes exactly as it does alone."""
    from rsd_engine import Generator

    model = (Engine(*tiny_pair, device="cpu", max_batch_size=2, max_seq_len=64, sampler="reference") if kind == "engine"
             else Generator(tiny_pair[1], device="cpu", max_batch_size=2, max_seq_len=64, sampler="reference"))
    params = SamplingParams(max_new_tokens=6, seed=5, ignore_eos=True)
    alone = model.generate_batch(PROMPTS, params)  # 3 prompts over 2 slots
    stream = model.generate_iter(PROMPTS, params)
    first = next(stream)
    with pytest.raises(RuntimeError, match="score_batch called while a generate_iter of this engine is paused.*"
                                           r"Exhaust the iterator or close\(\) it first"):
        model.score_batch(PROMPTS[:2], [" 2", " 3"])
    with pytest.raises(RuntimeError, match="generate_iter called while a generate_iter of this engine is paused"):
        model.generate_batch(PROMPTS[:1], params)
    finished = dict([first, *stream])
    assert [finished[i].token_ids for i in range(3)] == [r.token_ids for r in alone]

    scores = model.score_batch(PROMPTS[:2], [" 2", " 3"])
    stream = model.generate_iter(PROMPTS, params)
    next(stream)
    stream.close()
    assert model.score_batch(PROMPTS[:2], [" 2", " 3"]) == scores


def test_pipelined_loop_gives_the_same_results(tiny_pair, engine):
    """Committing step n while step n+1 runs (the CUDA default), forced on CPU: every request's tokens,
    decisions, log-probs, finish reason and text are those of the step-by-step loop, with rows joining
    and finishing (EOS, stop strings, lengths) all along."""
    piped = Engine(*tiny_pair, device="cpu", dtype="float32", max_batch_size=2, max_seq_len=128, sampler="reference")
    piped.pipelined = True
    base = engine.generate_batch([PROMPTS[0]], SamplingParams(max_new_tokens=12, **GREEDY, threshold=0.0))[0]
    needle = base.text[len(base.text) // 2: len(base.text) // 2 + 2]
    prompts = PROMPTS + ["Alice has 5 apples", PROMPTS[0]]
    params = [SamplingParams(max_new_tokens=5 + 4 * i, threshold=0.01, seed=20 + i) for i in range(4)]
    params.append(SamplingParams(max_new_tokens=12, **GREEDY, threshold=0.0, stop=[needle]))
    want = engine.generate_batch(prompts, params)
    got = piped.generate_batch(prompts, params)
    for w, g in zip(want, got):
        assert (g.token_ids, g.accepted, g.finish_reason, g.text) == (w.token_ids, w.accepted, w.finish_reason, w.text)
        # The step ahead can widen the attention span: the same sums over more masked zeros.
        assert g.teacher_logprobs == pytest.approx(w.teacher_logprobs, abs=1e-5)
        assert g.student_logprobs == pytest.approx(w.student_logprobs, abs=1e-5)
    assert got[-1].finish_reason == "stop"


def test_pipelined_generator_gives_the_same_tokens(tiny_pair):
    from rsd_engine import Generator

    params = [SamplingParams(max_new_tokens=4 + 5 * i, seed=i) for i in range(4)]
    plain = Generator(tiny_pair[1], device="cpu", dtype="float32", max_batch_size=2, max_seq_len=128)
    piped = Generator(tiny_pair[1], device="cpu", dtype="float32", max_batch_size=2, max_seq_len=128)
    piped.pipelined = True
    prompts = PROMPTS + ["1 + 2 ="]
    for w, g in zip(plain.generate_batch(prompts, params), piped.generate_batch(prompts, params)):
        assert (g.token_ids, g.finish_reason) == (w.token_ids, w.finish_reason)
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)
