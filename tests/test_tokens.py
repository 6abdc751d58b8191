"""Token-space alignment (DESIGN.md §4): shared ids, padding rows, mapped student-only specials."""
import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from rsd_engine import Engine, SamplingParams
from rsd_engine.tokens import align_token_spaces, load_tokenizer
from tiny import build_model, build_tokenizer


@pytest.fixture(scope="module")
def mapped_pair(tmp_path_factory, tiny_tokenizer_dir):
    """A teacher on the base tokenizer; a student whose tokenizer adds the special token <extra>."""
    root = tmp_path_factory.mktemp("mapped")
    student_tok = build_tokenizer(root / "student_tok", extra_special_tokens=("<extra>",))
    teacher = build_model(root / "teacher", "qwen2", tokenizer_dir=tiny_tokenizer_dir, hidden_size=64, seed=3)
    student = build_model(root / "student", "qwen3", tokenizer_dir=student_tok, seed=4)
    return teacher, student


def test_same_tokenizer_shares_every_real_id(tiny_pair):
    tok = load_tokenizer(tiny_pair[0])
    space = align_token_spaces(tok, tok, teacher_rows=512, student_rows=576)
    assert space.size == len(tok) and space.proposal_mask.all() and space.fallback_mask.all()
    assert space.teacher_pieces == {}


def test_padding_rows_are_never_candidates(tiny_pair):
    tok = load_tokenizer(tiny_pair[0])
    space = align_token_spaces(tok, tok, teacher_rows=len(tok) - 3, student_rows=576)
    assert space.size == len(tok) - 3  # rows the teacher lacks are outside the space


def test_student_only_special_is_mapped(mapped_pair):
    teacher_tok, student_tok = load_tokenizer(mapped_pair[0]), load_tokenizer(mapped_pair[1])
    space = align_token_spaces(teacher_tok, student_tok, teacher_rows=512, student_rows=512)
    extra = student_tok.convert_tokens_to_ids("<extra>")
    assert not space.proposal_mask[extra] and space.fallback_mask[extra]
    pieces = space.teacher_pieces[extra]
    assert len(pieces) > 1 and teacher_tok.decode(list(pieces)) == "<extra>"
    ids = student_tok.encode("a<extra>b", add_special_tokens=False)
    assert teacher_tok.decode(space.to_teacher(ids)) == "a<extra>b"


@pytest.mark.parametrize("pipelined", [False, True], ids=["step_by_step", "pipelined"])
def test_mapped_token_is_read_by_the_teacher_as_its_pieces(mapped_pair, monkeypatch, pipelined):
    """Force the student to write <extra>; the teacher's later log-probs must equal teacher forcing. Pipelined
    (the CUDA loop, forced on CPU), the step launched before the mapped token was committed is redone."""
    engine = Engine(*mapped_pair, device="cpu", max_batch_size=2, max_seq_len=64, sampler="reference")
    engine.pipelined = pipelined
    extra = engine.tokenizer.convert_tokens_to_ids("<extra>")
    real = engine.student.logits
    calls = {"n": 0}

    def prefer_extra(hidden):
        calls["n"] += 1
        out = real(hidden)
        # Steps 1 and 4; pipelined, step 2 runs twice (it was launched before step 1's <extra> was seen).
        if calls["n"] in ((2, 6) if pipelined else (2, 5)):
            out[..., extra] += 100.0
        return out

    monkeypatch.setattr(engine.student, "logits", prefer_extra)
    params = SamplingParams(max_new_tokens=8, threshold=1.0, temperature=0.0, student_temperature=0.0)
    result = engine.generate_batch(["The answer is"], params)[0]
    monkeypatch.setattr(engine.student, "logits", real)
    assert result.token_ids[1] == extra and result.token_ids[4] == extra
    score = engine.score_batch([result.prompt_token_ids], [result.token_ids])[0]
    # Teacher log-prob of a mapped token is the sum over its pieces; the steps after it read them all.
    for step in (0, 2, 3, 5, 6, 7):
        assert result.teacher_logprobs[step] == pytest.approx(score.teacher_logprobs[step], abs=1e-4)


def test_tokenizers_too_different(tmp_path, tiny_pair):
    tok = load_tokenizer(tiny_pair[0])
    vocab = tok.get_vocab()
    shuffled = {t: (i * 7 + 3) % len(vocab) for t, i in vocab.items()}  # same tokens, other ids
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(shuffled, unk_token="<|endoftext|>")))
    with pytest.raises(ValueError, match=r"share only \d+ of the student's \d+ token ids.*First mismatches: id 0"):
        align_token_spaces(tok, other, teacher_rows=512, student_rows=512)


def test_token_map_must_name_student_only_tokens(tiny_pair):
    tok = load_tokenizer(tiny_pair[0])
    with pytest.raises(ValueError, match="token_map names"):
        align_token_spaces(tok, tok, teacher_rows=512, student_rows=512, token_map={"<nope>": "x"})


def test_prompt_ids_outside_the_shared_space_are_refused(tiny_pair):
    engine = Engine(*tiny_pair, device="cpu", max_batch_size=1, max_seq_len=32, sampler="reference")
    with pytest.raises(ValueError, match=r"prompt 0: token 1 \(id 500\) has no equivalent"):
        engine.generate_batch([[3, 500]], SamplingParams(max_new_tokens=2))


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        load_tokenizer(tmp_path)
