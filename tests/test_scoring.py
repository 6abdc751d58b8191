"""score_sequences (the batched teacher-forced scorer) against HF transformers' log_softmax, and against
itself one sequence at a time: mixed lengths, more sequences than slots, sequences over the chunk size."""
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from rsd_engine import scoring
from rsd_engine.models import load_model
from rsd_engine.scoring import score_sequences
from tiny import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

SLOTS = 3


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def model_dir(request, tmp_path_factory, tiny_tokenizer_dir):
    return build_model(tmp_path_factory.mktemp(request.param), request.param, tokenizer_dir=tiny_tokenizer_dir,
                       hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96, seed=3)


@pytest.fixture(scope="module")
def ours(model_dir):
    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    return model, model.new_cache(SLOTS, 96)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 8 positions, forwards of 20 tokens and logit blocks of 3 rows: tiny sequences cross
    every boundary the real sizes have."""
    monkeypatch.setattr(scoring, "CHUNK", 8)
    monkeypatch.setattr(scoring, "FORWARD_TOKENS", 20)
    monkeypatch.setattr(scoring, "CPU_FORWARD_TOKENS", 20)
    monkeypatch.setattr(scoring, "LOGIT_ELEMENTS", 3 * 512)


def sequences(n=7, seed=0):
    rng = random.Random(seed)
    seqs = [[rng.randrange(450) for _ in range(rng.randrange(2, 60))] for _ in range(n)]
    seqs.append([rng.randrange(450) for _ in range(90)])  # longer than every chunk and forward
    starts = [rng.randrange(1, len(s) + 1) for s in seqs]
    starts[0] = 1
    return seqs, starts


def hf_logprobs(model_dir, seqs, starts):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for seq, start in zip(seqs, starts):
            lp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
            out.append([lp[q - 1, seq[q]].item() for q in range(start, len(seq))])
    return out


@pytest.mark.parametrize("max_batch", [1, SLOTS])
def test_batched_scores_equal_hf_log_softmax(model_dir, ours, small_chunks, max_batch):
    seqs, starts = sequences()
    got = score_sequences(*ours, seqs, starts, max_batch=max_batch)
    want = hf_logprobs(model_dir, seqs, starts)
    for g, w, seq, start in zip(got, want, seqs, starts):
        assert len(g) == len(seq) - start
        assert g == pytest.approx(w, abs=1e-4)


def test_batched_equals_one_at_a_time_at_real_sizes(ours):
    seqs, starts = sequences(n=5, seed=1)
    batched = score_sequences(*ours, seqs, starts)
    for seq, start, got in zip(seqs, starts, batched):
        assert got == pytest.approx(score_sequences(*ours, [seq], [start], max_batch=1)[0], abs=1e-5)


def test_scores_do_not_depend_on_neighbours(ours, small_chunks):
    """A sequence's scores are the same whatever else shares its forwards (no cross-row leakage)."""
    seqs, starts = sequences(n=5, seed=2)
    alone = score_sequences(*ours, seqs[:1], starts[:1])[0]
    for other in ([seqs[3], seqs[0]], [seqs[0], seqs[4], seqs[2]]):
        got = score_sequences(*ours, other, [1] * len(other))
        assert got[other.index(seqs[0])] == pytest.approx(alone, abs=1e-5)


@pytest.mark.parametrize("args,message", [
    (([[1, 2, 3]], [1, 1]), "1 sequences and 2 starts"),
    (([[1, 2, 3]], [0]), r"sequence 0: start 0 must be in \[1, 3\]"),
    (([[1, 2], [1, 2, 3]], [1, 4]), r"sequence 1: start 4 must be in \[1, 3\]"),
    (([[1] * 97], [1]), "sequence 0 has 97 tokens, more than the cache's max_seq_len 96"),
    (([[1, 2, 512]], [1]), r"sequence 0 holds token 512: token ids must be integers in \[0, 512\)"),
    (([[1, -1]], [1]), "sequence 0 holds token -1"),
])
def test_bad_input_is_named(ours, args, message):
    with pytest.raises(ValueError, match=message):
        score_sequences(*ours, *args)


def test_bad_max_batch_is_named(ours):
    with pytest.raises(ValueError, match=r"max_batch = 4: must be an integer in \[1, 3\]"):
        score_sequences(*ours, [[1, 2]], [1], max_batch=4)


def test_engine_score_batch_over_two_tokenizers_equals_hf(mapped_pair, small_chunks):
    """More pairs than slots, a completion over the chunk size, and a student-only token that the teacher
    reads as several ids: its teacher log-prob is the sum over those ids, each given the ones before."""
    from rsd_engine import Engine

    engine = Engine(*mapped_pair, device="cpu", max_batch_size=2, max_seq_len=96, sampler="reference")
    texts = ["The answer is <extra> 42.", "Let x be a number.<extra>", "1 + 1 = 2", "We compute 12 * 12 = 144 " * 3]
    prompts = ["Q: what?", "Solve:", "1 + 1", "Compute"]
    scores = engine.score_batch(prompts, texts)
    hf = [AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval() for d in mapped_pair]
    for prompt, text, score in zip(prompts, texts, scores):
        p, c = (engine.tokenizer.encode(s, add_special_tokens=False) for s in (prompt, text))
        with torch.no_grad():
            student = torch.log_softmax(hf[1](torch.tensor([p + c])).logits[0], -1)
        assert score.student_logprobs == pytest.approx([student[len(p) - 1 + j, t].item() for j, t in enumerate(c)],
                                                       abs=1e-4)
        seq, want = engine.space.to_teacher(p), []
        with torch.no_grad():
            teacher = torch.log_softmax(hf[0](torch.tensor([engine.space.to_teacher(p + c)])).logits[0], -1)
        for tok in c:
            pieces = engine.space.to_teacher([tok])
            want.append(sum(teacher[len(seq) - 1 + k, t].item() for k, t in enumerate(pieces)))
            seq = seq + pieces
        assert score.teacher_logprobs == pytest.approx(want, abs=1e-4)
    assert any(len(engine.space.to_teacher([t])) > 1 for t in engine.tokenizer.encode(texts[0], add_special_tokens=False))
