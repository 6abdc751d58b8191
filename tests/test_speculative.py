"""Exact speculative RSD in the engine (DESIGN.md §8): the joint law of (token, flag) is plain RSD's, greedy
output is plain output, an identical pair keeps every draft, outputs do not depend on the batch, the round
compiles with fullgraph=True, and bad draft_tokens values are named. The verify op's own per-backend tests
live with the op."""
import math

import numpy as np
import pytest
import torch

from law import chi_square_pvalue, softmax, truncate
from rsd_engine import Engine, SamplingParams
from rsd_engine.cli import main
from rsd_engine.pipeline.generate import GenerateOptions
from rsd_engine.pipeline.traces import trace_stats
from triton_device import engine_placement

pytestmark = pytest.mark.usefixtures("one_thread")

ALPHA = 1e-3  # chi-square significance: a correct engine fails about one run in a thousand per test
PROMPTS = ["The answer is", "Let x be a number such that 2x + 3 = 11. Then", "1 + 1 =", "Alice has 5 apples",
           "The derivative of x^3 is", "We compute 12 * 12"]
GREEDY = dict(temperature=0.0, student_temperature=0.0)


def engine_for(pair, draft_tokens, **kwargs):
    kwargs = {"device": "cpu", "max_batch_size": 3, "max_seq_len": 96, "sampler": "reference", **kwargs}
    return Engine(*pair, draft_tokens=draft_tokens, **kwargs)


@pytest.fixture(scope="module")
def plain(tiny_pair):
    return engine_for(tiny_pair, 0)


@pytest.fixture(scope="module")
def spec4(tiny_pair):
    return engine_for(tiny_pair, 4)


# ---------------------------------------------------------------------------- the law

# On the tiny pair and LAW_PROMPT, both flags are common at positions 1 and 2 with these.
LAW_PARAMS = dict(temperature=0.8, top_p=0.9, threshold=0.0014, check_temperature=2.0, student_temperature=0.9,
                  student_top_p=0.85, proposal_trials=2, ignore_eos=True)
LAW_PROMPT = "We compute 12 * 12"
LAW_DRAWS = 2000


def next_logits(model, ids):
    """Both models' logits for the token after ``ids``, straight from the model (no engine)."""
    cache = model.new_cache(1, len(ids))
    hidden = model(torch.tensor([ids]), torch.arange(len(ids))[None], cache, torch.tensor([0]), len(ids))
    return model.logits(hidden[0, -1]).double().numpy()


def joint_law(engine, ids, p: SamplingParams):
    """P(token y, accepted f) as a [V, 2] array, column 1 = teacher-written: qT·ok·c and r^K·qS (DESIGN §2)."""
    lt, ls = next_logits(engine.teacher, ids), next_logits(engine.student, ids)
    proposal, fallback = engine.space.proposal_mask.numpy(), engine.space.fallback_mask.numpy()
    V = len(proposal)
    q_teacher = truncate(lt[:V], p.temperature, p.top_k, p.top_p, proposal)
    q_student = truncate(ls[:V], p.student_temperature, p.student_top_k, p.student_top_p, fallback)
    ok = softmax(ls, p.check_temperature)[:V] >= p.threshold
    r = float(q_teacher[~ok].sum())
    K = p.proposal_trials
    return np.stack([r**K * q_student, q_teacher * ok * sum(r**k for k in range(K))], axis=1)


@pytest.mark.parametrize("draft_tokens", [1, 4])
def test_joint_law_of_token_and_flag(tiny_pair, draft_tokens):
    """Positions 1 and 2 (the latter given the most frequent first token) of many seeded requests, against
    plain RSD's analytic joint law; max_new_tokens = G+1 so that the first round verifies all G drafts."""
    engine = engine_for(tiny_pair, draft_tokens, max_batch_size=250, max_seq_len=32)
    prompt = engine.tokenizer.encode(LAW_PROMPT, add_special_tokens=False)
    params = [SamplingParams(max_new_tokens=draft_tokens + 1, seed=s, **LAW_PARAMS) for s in range(LAW_DRAWS)]
    results = engine.generate_batch([prompt] * LAW_DRAWS, params)
    cells = np.array([[r.token_ids[i] * 2 + r.accepted[i] for i in range(2)] for r in results])

    law1 = joint_law(engine, prompt, params[0])
    assert 0.2 < law1[:, 1].sum() < 0.8, "the test needs both flags common"
    assert chi_square_pvalue(cells[:, 0], law1.ravel()) > ALPHA

    first = np.bincount(cells[:, 0] // 2).argmax()
    given = cells[cells[:, 0] // 2 == first, 1]
    assert len(given) > 500
    law2 = joint_law(engine, prompt + [int(first)], params[0])
    assert 0.2 < law2[:, 1].sum() < 0.8, "the test needs both flags common"
    assert chi_square_pvalue(given, law2.ravel()) > ALPHA
    # Rounds actually kept drafts: fewer teacher passes than tokens.
    assert sum(r.teacher_passes for r in results) < 0.9 * sum(len(r.token_ids) for r in results)


# ---------------------------------------------------------------------------- same tokens as plain RSD

@pytest.mark.parametrize("threshold", [0.0, 0.02, 1.0])
def test_greedy_equals_plain_token_for_token(plain, spec4, threshold):
    """Mixed prompt lengths and max_new_tokens, more prompts than slots: the same tokens, flags and log-probs."""
    params = [SamplingParams(max_new_tokens=7 + 5 * i, threshold=threshold, **GREEDY) for i in range(len(PROMPTS))]
    want = plain.generate_batch(PROMPTS, params)
    got = spec4.generate_batch(PROMPTS, params)
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids and g.accepted == w.accepted and g.finish_reason == w.finish_reason
        assert g.teacher_logprobs == pytest.approx(w.teacher_logprobs, abs=1e-4)
        assert g.student_logprobs == pytest.approx(w.student_logprobs, abs=1e-4)
        assert w.teacher_passes == len(w.token_ids) and 1 <= g.teacher_passes <= len(g.token_ids)
    if threshold == 1.0:  # Q is the student's own argmax: every draft is kept
        assert all(g.teacher_passes == math.ceil(len(g.token_ids) / 5) for g in got if g.finish_reason == "length")


def test_stops_cut_a_round(plain, spec4):
    """A stop id, a stop string and max_seq_len inside a round end the output where plain RSD ends it."""
    base = plain.generate_batch([PROMPTS[0]], SamplingParams(max_new_tokens=20, threshold=1.0, **GREEDY))[0]
    stop_id = base.token_ids[6]
    needle = base.text[len(base.text) // 2: len(base.text) // 2 + 2]
    cases = [SamplingParams(max_new_tokens=20, threshold=1.0, stop_token_ids=[stop_id], **GREEDY),
             SamplingParams(max_new_tokens=20, threshold=1.0, stop=[needle], **GREEDY)]
    for params in cases:
        w, g = (e.generate_batch([PROMPTS[0]], params)[0] for e in (plain, spec4))
        assert g.token_ids == w.token_ids and g.text == w.text and g.finish_reason == w.finish_reason == "stop"
    # Sampled: the run ends at the first token that completes a stop string.
    stops = ["e", "1", " t"]
    for seed in range(4):
        g = spec4.generate_batch([PROMPTS[0]], SamplingParams(max_new_tokens=40, seed=seed, stop=stops))[0]
        decode = lambda ids: spec4.tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
        assert g.finish_reason == "stop"
        assert any(s in decode(g.token_ids) for s in stops) and not any(s in decode(g.token_ids[:-1]) for s in stops)


def test_cache_limit_inside_a_round(tiny_pair):
    params = SamplingParams(max_new_tokens=100, threshold=1.0, **GREEDY)
    w, g = (engine_for(tiny_pair, G, max_seq_len=13).generate_batch([[5, 6, 7, 8, 9]], params)[0] for G in (0, 4))
    assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason
    assert len(g.token_ids) + 5 <= 13


def test_a_budget_past_any_cache_runs_to_the_cache_limit(tiny_pair):
    """max_new_tokens = 2**63 (SamplingParams sets no upper bound) crashed speculative decoding in torch.tensor (the
    device's int64 budget); plain decoding ran to max_seq_len. Both do now, the same tokens."""
    params = SamplingParams(max_new_tokens=2**63, threshold=1.0, ignore_eos=True, **GREEDY)
    w, g = (engine_for(tiny_pair, G, max_seq_len=13).generate_batch([[5, 6, 7, 8, 9]], params)[0] for G in (0, 4))
    assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason == "length"


@pytest.mark.parametrize("sampler", ["cpp", "triton"])
def test_every_backend_gives_the_reference_outputs(tiny_pair, spec4, sampler):
    """Seeded speculative generations are token for token the same on every backend that has the ops."""
    other = engine_for(tiny_pair, 4, sampler=sampler, **engine_placement(sampler))
    params = [SamplingParams(max_new_tokens=10, threshold=0.003, top_k=50, proposal_trials=2, seed=9 + i)
              for i in range(3)]
    for w, g in zip(spec4.generate_batch(PROMPTS[:3], params), other.generate_batch(PROMPTS[:3], params)):
        assert g.token_ids == w.token_ids and g.accepted == w.accepted and g.teacher_passes == w.teacher_passes
        assert g.teacher_logprobs == pytest.approx(w.teacher_logprobs, abs=1e-4)


# ---------------------------------------------------------------------------- rounds that keep every draft

@pytest.mark.parametrize("draft_tokens", [1, 3])
def test_identical_pair_keeps_every_draft(tiny_pair, draft_tokens):
    """Teacher = student and threshold 0: Q = qS, so every draft is kept and a round emits G+1 tokens."""
    engine = engine_for((tiny_pair[1], tiny_pair[1]), draft_tokens, max_batch_size=4)
    n = 6 * (draft_tokens + 1)
    params = SamplingParams(max_new_tokens=n, temperature=0.7, top_p=1.0, student_temperature=0.7, student_top_p=1.0,
                            threshold=0.0, seed=4, ignore_eos=True)
    results = engine.generate_batch(PROMPTS, params)
    for r in results:
        assert len(r.token_ids) == n and r.teacher_passes == 6 and all(r.accepted)
    assert engine._speculative.stats.alpha == 1.0


@pytest.mark.parametrize("pair", ["identical", "different"])
def test_draft_statistics_count_what_the_rounds_did(tiny_pair, pair):
    """DraftStats (the bench's α = kept / checked) against each row's run as the round gave it to the commit: a round
    of n drafts emits its kept drafts and one more token (a residual at the first rejection, or a bonus after all
    n), so it checks one more draft than it keeps exactly when it rejects one. Only budgets end these requests
    (ignore_eos, no stops) and num_draft leaves room for a round's last token under max_new_tokens and
    max_seq_len: no round is cut, every token a round emits is committed."""
    identical = pair == "identical"
    engine = engine_for((tiny_pair[1],) * 2 if identical else tiny_pair, 3, max_seq_len=24)
    spec, rounds = engine._speculative, []
    commit = engine._commit

    def recording(batch, runs):  # before the commit: _num_draft is what the round was sized with
        rounds.extend((len(run), spec._num_draft(r)) for r, run in zip(batch, runs))
        return commit(batch, runs)

    engine._commit = recording
    # Budgets of 2 (one draft fits), 7 and 10 (not whole rounds), and the cache's limit (30 does not fit 24).
    # threshold 0: Q is the teacher's law, the student's own (every draft kept) for the identical pair; hot, so that
    # the tiny pair's laws overlap (drafts kept and rejected).
    params = [SamplingParams(max_new_tokens=k, threshold=0.0, temperature=2.0, top_p=1.0, student_temperature=2.0,
                             student_top_p=1.0, seed=k, ignore_eos=True) for k in (2, 7, 10, 30)]
    results = engine.generate_batch(PROMPTS[:4], params)
    stats = spec.stats
    assert stats.rounds == len(rounds) == sum(r.teacher_passes for r in results)
    assert all(1 <= m <= n + 1 for m, n in rounds), rounds
    assert stats.emitted == sum(len(r.token_ids) for r in results) == sum(m for m, _ in rounds)
    assert stats.kept == sum(m - 1 for m, _ in rounds)
    assert stats.checked == stats.kept + sum(m <= n for m, n in rounds)
    assert 0 < stats.kept == stats.checked if identical else 0 < stats.kept < stats.checked, (stats, rounds)


def test_a_round_reads_the_uniforms_of_its_positions(tiny_pair, monkeypatch):
    """Randomness contract (DESIGN.md §3, §8): a round starting at step t drafts position t + i with draw DRAFT_DRAW
    of step t + i, and verifies with the uniforms of steps t .. t + G, so every draft has a draw of its own."""
    from rsd_engine import speculative
    from rsd_engine.randomness import DRAFT_DRAW, round_uniforms

    engine = engine_for(tiny_pair, 3)
    spec, G = engine._speculative, 3
    starts, drafts, verified = [], [], []
    real_round, real_sample, real_verify = spec.round, speculative.sample_tokens, speculative.rsd_verify

    def round_(inputs, **kwargs):
        starts.append((inputs["seeds"].clone(), inputs["steps"].clone()))
        return real_round(inputs, **kwargs)

    def sample(logits, uniforms, *args, **kwargs):
        drafts.append(uniforms.clone())
        return real_sample(logits, uniforms, *args, **kwargs)

    def verify(teacher_logits, student_logits, draft, num_draft, uniforms, *args, **kwargs):
        verified.append(uniforms.clone())
        return real_verify(teacher_logits, student_logits, draft, num_draft, uniforms, *args, **kwargs)

    monkeypatch.setattr(spec, "round", round_)
    monkeypatch.setattr(speculative, "sample_tokens", sample)
    monkeypatch.setattr(speculative, "rsd_verify", verify)
    params = [SamplingParams(max_new_tokens=9, threshold=0.01, seed=40 + i) for i in range(3)]
    engine.generate_batch(PROMPTS[:3], params)
    assert len(starts) >= 2 and len(drafts) == G * len(starts) and len(verified) == len(starts)
    for k, (seeds, steps) in enumerate(starts):
        want = round_uniforms(seeds, steps, G + 1)
        assert torch.equal(verified[k], want)
        for i in range(G):
            assert torch.equal(drafts[G * k + i], want[:, i, DRAFT_DRAW]), (k, i)


# ---------------------------------------------------------------------------- randomness contract

def test_output_does_not_depend_on_the_batch(tiny_pair, spec4):
    params = [SamplingParams(max_new_tokens=12 + 3 * i, threshold=0.01, seed=50 + i) for i in range(len(PROMPTS))]
    batched = spec4.generate_batch(PROMPTS, params)
    wide = engine_for(tiny_pair, 4, max_batch_size=6)
    order = [3, 5, 0, 2, 4, 1]
    shuffled = wide.generate_batch([PROMPTS[i] for i in order], [params[i] for i in order])
    for i, j in enumerate(order):
        alone = spec4.generate_batch([PROMPTS[j]], params[j])[0]
        assert alone.token_ids == batched[j].token_ids == shuffled[i].token_ids
        assert alone.accepted == batched[j].accepted == shuffled[i].accepted
        assert alone.teacher_passes == batched[j].teacher_passes
    assert len({tuple(r.token_ids) for r in batched}) == len(PROMPTS)


@pytest.mark.parametrize("model", ["teacher", "student"])
def test_nonfinite_row_fails_alone(tiny_pair, model, monkeypatch):
    """A row whose logits turn NaN mid-round ends with finish_reason "error"; the others are unchanged."""
    eng = engine_for(tiny_pair, 3)
    params = SamplingParams(max_new_tokens=12, threshold=0.01, seed=3, ignore_eos=True)
    alone = eng.generate_batch([PROMPTS[0], PROMPTS[2]], params)
    net = getattr(eng, model)
    real, calls = net.logits, {"n": 0}

    first_bad = 2 if model == "teacher" else 6  # the second round, for either model

    def broken(hidden):  # from then on, the middle row (prompt 1, slot 1) is NaN
        calls["n"] += 1
        out = real(hidden)
        if calls["n"] >= first_bad and out.shape[0] == 3:
            out[1] = float("nan")
        return out

    monkeypatch.setattr(net, "logits", broken)
    results = eng.generate_batch(PROMPTS[:3], params)
    assert results[1].finish_reason == "error" and f"the {model}'s logits hold NaN" in results[1].error
    for want, got in zip(alone, (results[0], results[2])):
        assert got.token_ids == want.token_ids and got.accepted == want.accepted and got.finish_reason == "length"


def test_mapped_token_ends_a_round(tiny_pair, tmp_path):
    """A student-only special token, which the teacher reads as several pieces: the run ends at it, and
    greedy output is still plain output. The student is the tiny one with that token's head row made a
    slightly scaled copy of the row of the token it writes most, so that it often wins."""
    from safetensors.torch import load_file, save_file

    from tiny import build_model, build_tokenizer

    tok = build_tokenizer(tmp_path / "tok", extra_special_tokens=("<|think_hard|>",))
    student = build_model(tmp_path / "student", "qwen3", tokenizer_dir=tok, hidden_size=64, num_layers=2,
                          num_heads=4, num_kv_heads=2, intermediate_size=128, seed=2)
    params = SamplingParams(max_new_tokens=24, threshold=0.5, ignore_eos=True, **GREEDY)
    first = engine_for((tiny_pair[0], student), 0).generate_batch(PROMPTS[:3], params)
    favourite = int(np.bincount([t for r in first for t in r.token_ids]).argmax())
    state = load_file(str(student / "model.safetensors"))
    mapped = max(engine_for((tiny_pair[0], student), 0).space.teacher_pieces)
    state["lm_head.weight"][mapped] = 1.05 * state["lm_head.weight"][favourite]
    save_file(state, str(student / "model.safetensors"), metadata={"format": "pt"})

    plain_e, spec_e = engine_for((tiny_pair[0], student), 0), engine_for((tiny_pair[0], student), 3)
    assert len(spec_e.space.teacher_pieces[mapped]) > 1
    want, got = plain_e.generate_batch(PROMPTS[:3], params), spec_e.generate_batch(PROMPTS[:3], params)
    assert sum(w.token_ids.count(mapped) for w in want) >= 3, "the test needs the mapped token in the output"
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids and g.accepted == w.accepted
        assert g.teacher_logprobs == pytest.approx(w.teacher_logprobs, abs=1e-4, nan_ok=True)
        # one step scores only a mapped token's first piece: its teacher log-prob is not measured (NaN), the others are
        assert all(math.isnan(lp) == (t == mapped) for t, lp in zip(g.token_ids, g.teacher_logprobs))
        scored = [-lp for lp in g.teacher_logprobs if not math.isnan(lp)]  # a trace's stats skip the NaN
        assert trace_stats(g.accepted, g.teacher_logprobs, g.student_logprobs)["mean_teacher_surprisal"] == \
            pytest.approx(sum(scored) / len(scored))


# ---------------------------------------------------------------------------- static shapes

@pytest.mark.parametrize("sampler", ["reference"])  # the fused ops' own compile tests live with them
def test_round_compiles_fullgraph(tiny_pair, sampler):
    """The round (G+1 student forwards with draft sampling, the teacher's verify forward, rsd_verify) has no
    graph breaks and no host syncs: aot_eager as in test_compile.py."""
    torch._dynamo.reset()
    engine = engine_for(tiny_pair, 2, max_seq_len=64, sampler=sampler)
    engine.generate_batch(PROMPTS[:3], SamplingParams(max_new_tokens=2, seed=0))
    batch = []
    from rsd_engine.results import GenerationResult
    from rsd_engine.scheduler import Request

    for slot, prompt in enumerate(PROMPTS[:3]):
        ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
        r = Request(slot, ids, ids, SamplingParams(threshold=0.01, seed=slot), seed=slot, result=GenerationResult(ids))
        r.slot, r.student_len, r.teacher_len = slot, len(ids) - 1, len(ids) - 1
        r.next_student_token = r.next_teacher_token = ids[-1]
        batch.append(r)
    spec = engine._speculative
    inputs = spec.round_inputs(batch, with_slots=True)
    eager = spec.round(inputs, teacher_kv=16, student_kv=16)
    compiled = torch.compile(spec.round, fullgraph=True, dynamic=False, backend="aot_eager")
    got = compiled(inputs, teacher_kv=16, student_kv=16)
    for name in ("tokens", "num_emitted", "accepted"):
        assert torch.equal(getattr(eager, name), getattr(got, name)), name
    torch.testing.assert_close(eager.teacher_logprob, got.teacher_logprob, atol=1e-4, rtol=1e-4, equal_nan=True)


def test_graph_runner_plumbing_on_cpu(tiny_pair):
    """The self-feeding graph runner over the rounds' step state (the device moves rows on and sizes
    num_draft itself), exercised with capture off: the same tokens as the plain loop."""
    engine = engine_for(tiny_pair, 2, max_seq_len=64)
    spec = engine._speculative
    runner = engine._capture(64, spec._round_and_advance)
    assert not runner.enabled and runner.buckets == [1, 2, 3]
    params = SamplingParams(max_new_tokens=9, threshold=0.01, seed=1)
    want = engine.generate_batch(PROMPTS[:3], params)

    def run_round(batch):
        state = engine._state
        state.sync(batch)
        assert runner(len(batch)) == len(batch)
        return state.read(state.out[:len(batch)])

    spec._run_round = run_round
    got = engine.generate_batch(PROMPTS[:3], params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("value, message", [
    (-1, "draft_tokens = -1: must be an integer >= 0"),
    (2.0, "draft_tokens = 2.0: must be an integer >= 0"),
    (True, "draft_tokens = True: must be an integer >= 0"),
    ("4", "draft_tokens = '4': must be an integer >= 0"),
    (63, r"draft_tokens = 63: a round of 64 tokens after a one-token prompt cannot fit max_seq_len = 64; "
         r"use draft_tokens <= 62"),
])
def test_bad_draft_tokens_are_named(tiny_pair, value, message):
    with pytest.raises(ValueError, match=message):
        Engine(*tiny_pair, device="cpu", max_seq_len=64, draft_tokens=value)


def test_cli_draft_tokens(tiny_pair, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--teacher", "t", "--student", "s", "--data", "d", "--out", str(tmp_path / "o"),
              "--draft-tokens", "-2"])
    assert exit_info.value.code == 2 and "argument --draft-tokens: must be an integer >= 0, got '-2'" in \
        capsys.readouterr().err
    with pytest.raises(ValueError, match="--draft-tokens = -1: must be an integer >= 0"):
        GenerateOptions(teacher="t", student="s", data="d", out=str(tmp_path / "o"), draft_tokens=-1)


def test_cli_generate_with_draft_tokens_matches_plain(tiny_pair, tmp_path):
    """`rsd generate --draft-tokens 3`, greedy: the same records as plain RSD."""
    import json

    from rsd_engine.pipeline.records import read_records

    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": q, "answer": "4"}) + "\n"
                            for i, q in enumerate(PROMPTS[:3])))
    records = {}
    for G in (0, 3):
        out = tmp_path / f"out{G}.jsonl"
        assert main(["generate", "--teacher", str(tiny_pair[0]), "--student", str(tiny_pair[1]), "--data", str(data),
                     "--out", str(out), "--attempts", "1", "--max-new-tokens", "12", "--temperature", "0",
                     "--student-temperature", "0", "--threshold", "0.02", "--max-batch-size", "2",
                     "--sampler", "reference", "--no-progress", "--draft-tokens", str(G)]) == 0
        records[G] = {r["id"]: r for r in read_records(out)}
    assert sorted(records[3]) == ["q0", "q1", "q2"]
    for key in ("token_ids", "completion", "status", "finish_reason"):
        assert {i: r[key] for i, r in records[3].items()} == {i: r[key] for i, r in records[0].items()}
