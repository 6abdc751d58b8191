"""Token-space alignment (DESIGN.md §4): shared ids, padding rows, mapped student-only added tokens."""
import json
import math
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rsd_engine import Engine, SamplingParams
from rsd_engine.tokens import align_token_spaces, load_tokenizer
from tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, _corpus_lines, build_model, build_tokenizer


def with_added(tokenizer_dir, *tokens, special=False):
    """The tiny tokenizer plus added tokens after its last id; special=False as Qwen3 marks <think>."""
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer.add_tokens([AddedToken(t, special=special, normalized=False) for t in tokens])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def sentencepiece_like(*extra_special, alphabet=()):
    """A Metaspace BPE (dummy-prefix space, unknown token) like Llama-2 / TinyLlama's fast tokenizers."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=list(alphabet), show_progress=False)
    tokenizer.train_from_iterator(_corpus_lines(), trainer)
    tokenizer.add_special_tokens(list(extra_special))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


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


def test_student_only_non_special_added_token_is_mapped(tiny_tokenizer_dir):
    """Qwen3 (and R1 distills) mark <think> / </think> special: false; they are mapped all the same."""
    teacher_tok = load_tokenizer(tiny_tokenizer_dir)
    student_tok = with_added(tiny_tokenizer_dir, "<reason>", "</reason>")
    reason = student_tok.convert_tokens_to_ids("<reason>")
    assert not student_tok.added_tokens_decoder[reason].special
    space = align_token_spaces(teacher_tok, student_tok, teacher_rows=512, student_rows=512)
    assert set(space.teacher_pieces) == {reason, reason + 1} and space.fallback_mask[reason]
    ids = student_tok.encode("<|im_start|>assistant\n<reason>\n", add_special_tokens=False)
    assert reason in ids
    assert teacher_tok.decode(space.to_teacher(ids)) == "<|im_start|>assistant\n<reason>\n"


def test_student_only_token_past_the_teachers_rows_is_a_clear_error(tiny_tokenizer_dir):
    """A teacher without padding rows (its rows = its tokens) cannot hold a student-only id past them: the
    token space ends at the teacher's last row, and a token_map naming such a token says so."""
    teacher_tok = load_tokenizer(tiny_tokenizer_dir)
    student_tok = with_added(tiny_tokenizer_dir, "<extra>", special=True)
    extra = student_tok.convert_tokens_to_ids("<extra>")
    padded = align_token_spaces(teacher_tok, student_tok, teacher_rows=512, student_rows=512)
    assert extra in padded.teacher_pieces
    unpadded = align_token_spaces(teacher_tok, student_tok, teacher_rows=len(teacher_tok), student_rows=512)
    assert unpadded.size == extra and "past the teacher's last embedding row" in unpadded.unmapped[extra]
    with pytest.raises(ValueError, match=r"past the teacher's last embedding row \(it has 455\)"):
        unpadded.to_teacher([extra])
    with pytest.raises(ValueError, match=r"token_map names '<extra>', whose student id 455 is past the teacher's "
                                         r"last embedding row"):
        align_token_spaces(teacher_tok, student_tok, teacher_rows=len(teacher_tok), student_rows=512,
                           token_map={"<extra>": "<extra>"})


def test_mapped_pieces_must_read_the_token_text():
    """A sentencepiece teacher: pieces holding its unknown token are refused (an error for token_map, left
    unmapped by default), and the dummy-prefix space it puts before a text encoded alone is not read."""
    teacher, student = sentencepiece_like(), sentencepiece_like("<think>")
    think = student.convert_tokens_to_ids("<think>")
    space = align_token_spaces(teacher, student, teacher_rows=448, student_rows=448)
    assert think not in space.teacher_pieces and "unknown token '<unk>'" in space.unmapped[think]
    with pytest.raises(ValueError, match=r"token_map maps '<think>' \(student id 400\) to '<think>', which the "
                                         r"teacher cannot read: .*unknown token"):
        align_token_spaces(teacher, student, teacher_rows=448, student_rows=448, token_map={"<think>": "<think>"})

    teacher, student = sentencepiece_like(alphabet="<>"), sentencepiece_like("<think>", alphabet="<>")
    space = align_token_spaces(teacher, student, teacher_rows=448, student_rows=448)
    for text in ("a<think>b", "<think>b", "a <think> b"):
        ids = student.encode(text, add_special_tokens=False)
        assert think in ids and teacher.decode(space.to_teacher(ids)) == text


# Texts of every kind (multi-byte UTF-8: CJK, emoji with ZWJ and skin tones, combining marks, RTL, maths; whitespace
# runs; special and added tokens, and their spellings in pieces) and id runs that split a character across byte tokens.
_TEXT_POOLS = (
    [chr(c) for c in range(32, 127)], list("思考中文日本語한국어"), ["🙂", "👍🏽", "👩\u200d💻", "👨\u200d👩\u200d👧", "🇫🇷"],
    ["e\u0301", "a\u0308", "\u0301"], list("مرحبا שלום") + ["\u200f", "\u202e"], list("∑∫√∞≤≠±×÷π½²°"),
    [" ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "\u3000"],
    ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<extra>", "<reason>", "思考", "👩\u200d💻", " <x>", "<", "think>"],
)


def test_mapped_ids_read_the_same_text_in_the_teachers_space(mapped_pair, tiny_tokenizer_dir):
    """DESIGN.md §4: the teacher ids a student sequence maps to (shared ids as they are, a mapped token as its pieces)
    spell exactly the text the student ids spell: nothing lost, doubled or reordered, whatever the text, and for
    any run of writable ids (a character split across byte-level tokens, a mapped token between its bytes)."""
    import random

    teacher_tok = load_tokenizer(tiny_tokenizer_dir)
    students = [load_tokenizer(mapped_pair[1]),
                with_added(tiny_tokenizer_dir, "<reason>", "思考", "👩\u200d💻", " <x>", "\n\n\n")]
    rng = random.Random(0)
    for student_tok in students:
        space = align_token_spaces(teacher_tok, student_tok, teacher_rows=512, student_rows=512)
        assert space.teacher_pieces
        writable = space.fallback_mask.nonzero()[:, 0].tolist()

        def read(tokenizer, ids):
            return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

        for _ in range(150):
            pools = rng.sample(_TEXT_POOLS, rng.randint(1, 3))
            text = "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 20)))
            ids = student_tok.encode(text, add_special_tokens=False)
            runs = [ids, [rng.choice(writable) for _ in range(rng.randint(1, 12))]]
            runs.append([*ids[:len(ids) // 2], rng.choice(list(space.teacher_pieces)), *ids[len(ids) // 2:]])
            for run in runs:
                assert read(teacher_tok, space.to_teacher(run)) == read(student_tok, run), (text, run)


@pytest.fixture(scope="module")
def permuted_pair(tmp_path_factory, tiny_tokenizer_dir):
    """A teacher whose tokenizer holds <think> and </think> at each other's ids (as R1-Distill-Qwen holds them at
    151648/9 where Qwen3 has 151667/8): each is one teacher token, at another id."""
    root = tmp_path_factory.mktemp("permuted")
    data = json.loads((tiny_tokenizer_dir / "tokenizer.json").read_text())
    data["added_tokens"] = []
    tokenizer = Tokenizer.from_str(json.dumps(data))
    tokenizer.add_special_tokens([t for t in SPECIAL_TOKENS if "think" not in t] + ["</think>", "<think>"])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            chat_template=CHAT_TEMPLATE).save_pretrained(str(root / "teacher_tok"))
    teacher = build_model(root / "teacher", "qwen2", tokenizer_dir=root / "teacher_tok", hidden_size=48, seed=5)
    student = build_model(root / "student", "qwen3", tokenizer_dir=tiny_tokenizer_dir, hidden_size=48, seed=6)
    return teacher, student


def test_a_token_the_teacher_has_at_another_id_is_proposed_as_that_token(permuted_pair):
    """A mapped token the teacher reads as one token of its own was never proposed (the teacher's mass on it was
    dropped: a teacher about to close its reasoning proposed something else) and had NaN teacher log-probs. The
    teacher's logits are now read in the student's ids (its columns permuted: every softmax the same)."""
    teacher_tok, student_tok = load_tokenizer(permuted_pair[0]), load_tokenizer(permuted_pair[1])
    think, close = student_tok.convert_tokens_to_ids(["<think>", "</think>"])
    space = align_token_spaces(teacher_tok, student_tok, teacher_rows=512, student_rows=512)
    assert space.teacher_columns == {think: close, close: think} and space.proposal_mask[[think, close]].all()
    assert not space.is_shared(think) and space.to_teacher([think, close]) == [close, think]
    logits = torch.randn(3, 2, 512)
    aligned = space.align_teacher(logits.clone())
    assert torch.equal(aligned[..., [think, close]], logits[..., [close, think]])
    assert torch.equal(aligned.sort(-1).values, logits.sort(-1).values)  # a permutation of each row

    for sampler, draft_tokens in (("reference", 0), ("cpp", 0), ("reference", 2)):
        engine = Engine(*permuted_pair, device="cpu", max_batch_size=1, max_seq_len=64, sampler=sampler,
                        draft_tokens=draft_tokens)
        real_teacher, real_student = engine.teacher.logits, engine.student.logits
        # The teacher wants its own </think> (its id `think`), the student finds it likely: the teacher proposes it.
        engine.teacher.logits = lambda hidden: real_teacher(hidden).index_fill(-1, torch.tensor([think]), 30.0)
        engine.student.logits = lambda hidden: real_student(hidden).index_fill(-1, torch.tensor([close]), 30.0)
        params = SamplingParams(max_new_tokens=5, temperature=0.0, student_temperature=0.0, ignore_eos=True)
        result = engine.generate_batch(["The answer is"], params)[0]
        score = engine.score_batch([result.prompt_token_ids], [result.token_ids])[0]  # teacher forcing, same logits
        engine.teacher.logits, engine.student.logits = real_teacher, real_student
        assert result.token_ids == [close] * 5 and all(result.accepted), (sampler, draft_tokens)
        assert result.teacher_logprobs == pytest.approx(score.teacher_logprobs, abs=1e-4)  # not NaN


def test_a_token_mapped_to_several_teacher_tokens_is_never_proposed(permuted_pair):
    """Only a token the teacher reads as one token of its own is proposed (its column is that token's): one mapped to
    several is not, even where its first piece is no shared id (that piece's column is not the token's law)."""
    teacher_tok, student_tok = load_tokenizer(permuted_pair[0]), load_tokenizer(permuted_pair[1])
    think, close = student_tok.convert_tokens_to_ids(["<think>", "</think>"])
    space = align_token_spaces(teacher_tok, student_tok, teacher_rows=512, student_rows=512,
                               token_map={"<think>": "<think><think>"})
    assert space.teacher_pieces[think] == (close, close) and not space.is_shared(close)  # the teacher's <think>
    assert space.teacher_columns == {close: think}
    assert space.proposal_mask[close] and not space.proposal_mask[think] and space.fallback_mask[think]


def test_the_teachers_eos_ends_a_trace_at_the_students_id_of_that_token(permuted_pair, monkeypatch):
    """A teacher whose EOS is a token the student has at another id (its </think> here, as an R1 distill's EOS is
    Qwen3's at another id): the student's id of that token ends a trace, and the student's other token that sits
    at the teacher's EOS id (its <think>) does not."""
    import dataclasses

    engine = Engine(*permuted_pair, device="cpu", max_batch_size=1, max_seq_len=64, sampler="reference")
    think, close = engine.tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    teacher_close = engine.teacher_tokenizer.convert_tokens_to_ids("</think>")
    assert teacher_close == think and engine.space.teacher_columns[close] == teacher_close
    monkeypatch.setattr(engine.teacher, "config", dataclasses.replace(engine.teacher.config,
                                                                       eos_token_ids=(teacher_close,)))
    eos = engine._eos_ids()
    assert close in eos and think not in eos and engine.tokenizer.eos_token_id in eos


@pytest.mark.parametrize("draft_tokens", [0, 2])
def test_a_token_mapped_to_a_shared_teacher_token_is_not_scored_by_another_tokens_column(mapped_pair, draft_tokens):
    """token_map={"<extra>": "<think>"}: one teacher token, but a shared one (its column stays the student's
    <think>'s), so the teacher does not propose <extra> and its step log-prob would be read at <extra>'s own id (a
    padding row of the teacher): NaN, as for any token the step does not score (score_batch does)."""
    engine = Engine(*mapped_pair, device="cpu", max_batch_size=1, max_seq_len=64, sampler="reference",
                    token_map={"<extra>": "<think>"}, draft_tokens=draft_tokens)
    extra = engine.tokenizer.convert_tokens_to_ids("<extra>")
    assert engine.space.teacher_pieces[extra] == (engine.tokenizer.convert_tokens_to_ids("<think>"),)
    assert extra not in engine.space.teacher_columns and not engine.space.proposal_mask[extra]
    real = engine.student.logits
    engine.student.logits = lambda hidden: real(hidden).index_fill(-1, torch.tensor([extra]), 1e4)
    params = SamplingParams(max_new_tokens=3, threshold=1.0, temperature=0.0, student_temperature=0.0,
                            ignore_eos=True)
    result = engine.generate_batch(["The answer is"], params)[0]
    score = engine.score_batch([result.prompt_token_ids], [result.token_ids])[0]
    engine.student.logits = real
    assert result.token_ids == [extra] * 3 and all(lp != lp for lp in result.teacher_logprobs)  # NaN
    assert all(lp == lp for lp in score.teacher_logprobs)


def test_an_output_of_the_earlier_proposal_rule_is_not_extended(permuted_pair, tiny_pair, tmp_path, capsys):
    """For a pair whose student maps a token to one teacher token at another id, the teacher now proposes it: an
    output an earlier rsd wrote for it (never proposed) would get traces of another law beside its own. Its manifest
    records the rule ("token space"); one without it is refused, unless --force. A pair over one tokenizer records
    nothing: its outputs resume as they did."""
    import json as _json

    from rsd_engine.cli import main
    from rsd_engine.pipeline.records import read_records

    data = tmp_path / "p.jsonl"
    data.write_text("".join(_json.dumps({"id": f"q{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(3)))

    def generate(pair, out, *extra):
        return main(["generate", "--teacher", str(pair[0]), "--student", str(pair[1]), "--data", str(data), "--out",
                     str(out), "--attempts", "1", "--max-new-tokens", "4", "--device", "cpu", "--no-progress", *extra])

    out = tmp_path / "out.jsonl"
    assert generate(permuted_pair, out, "--limit", "1") == 0
    manifest = tmp_path / "out.jsonl.manifest.json"
    held = _json.loads(manifest.read_text())
    assert held["settings"]["token space"] == 2
    del held["settings"]["token space"]  # as an earlier rsd wrote it
    manifest.write_text(_json.dumps(held))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        generate(permuted_pair, out)
    assert stopped.value.code == 2 and "token space: 1 in the output, 2 now" in capsys.readouterr().err
    assert len(read_records(out)) == 1
    assert generate(permuted_pair, out, "--force") == 0 and len(read_records(out)) == 3

    same = tmp_path / "same.jsonl"
    assert generate(tiny_pair, same, "--limit", "1") == 0
    assert "token space" not in _json.loads((tmp_path / "same.jsonl.manifest.json").read_text())["settings"]
    # Either side of a comparison (rsd merge compares its files with the first one, in any order).
    from rsd_engine.pipeline.manifest import differences

    assert differences({"token space": 2}, {}) == ["token space: 2 in the output, 1 now"]
    assert differences({}, {"token space": 2}) == ["token space: 1 in the output, 2 now"]
    assert differences({"token space": 2}, {"token space": 2}) == [] == differences({}, {})


def test_the_aligned_step_compiles_fullgraph(permuted_pair):
    """The decode step with the teacher's columns moved still compiles whole (no graph break, no host sync)."""
    from test_compile import assert_same, decode_batch

    torch._dynamo.reset()
    engine = Engine(*permuted_pair, device="cpu", max_batch_size=3, max_seq_len=64, sampler="reference")
    inputs = engine._step_inputs(decode_batch(engine), with_slots=True)
    eager = engine.decode_step(inputs, teacher_kv=16, student_kv=16)
    step = torch.compile(engine.decode_step, fullgraph=True, dynamic=False, backend="aot_eager")
    assert_same(eager, step(inputs, teacher_kv=16, student_kv=16))


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


def test_pipelined_sampling_over_mapped_tokens_gives_the_step_by_step_tokens(mapped_pair):
    """Pipelined, a row that wrote a mapped token is sent again to redo its step (Engine._decode), with its own step
    counter: sampled tokens and flags are those of the step-by-step loop (the greedy test above reads no uniform).
    The student's <extra> logit is tied with its best one, so that it is often drawn."""
    results = {}
    for pipelined in (False, True):
        engine = Engine(*mapped_pair, device="cpu", max_batch_size=2, max_seq_len=64, sampler="reference")
        engine.pipelined = pipelined
        extra = engine.tokenizer.convert_tokens_to_ids("<extra>")
        real = engine.student.logits

        def tied(hidden):
            out = real(hidden)
            out[..., extra] = out.amax(-1)
            return out

        engine.student.logits = tied
        params = [SamplingParams(max_new_tokens=16, threshold=0.5, student_temperature=1.0, student_top_p=1.0,
                                 seed=seed, ignore_eos=True) for seed in (1, 2, 3)]
        results[pipelined] = engine.generate_batch(["The answer is", "1 + 1 =", "Alice has 5 apples"], params)
    for want, got in zip(results[False], results[True]):
        assert (got.token_ids, got.accepted) == (want.token_ids, want.accepted)
    assert sum(r.token_ids.count(extra) for r in results[False]) >= 3, "the test needs mapped tokens in the output"


@pytest.mark.parametrize("mode", ["step_by_step", "pipelined", "speculative"])
def test_a_mapped_token_whose_pieces_do_not_fit_ends_the_trace_before_it(mapped_pair, mode):
    """A sequence holds at most max_seq_len tokens in either model's space: a mapped token whose teacher pieces
    would pass it is not kept (the trace ends with "length" before it), so the engine's own score_batch takes
    every trace it writes."""
    for max_seq_len in range(20, 34):
        engine = Engine(*mapped_pair, device="cpu", max_batch_size=1, max_seq_len=max_seq_len, sampler="reference",
                        draft_tokens=2 if mode == "speculative" else 0)
        engine.pipelined = mode == "pipelined"
        extra = engine.tokenizer.convert_tokens_to_ids("<extra>")
        pieces = len(engine.space.teacher_pieces[extra])
        real = engine.student.logits
        engine.student.logits = lambda hidden: real(hidden).index_fill(-1, torch.tensor([extra]), 1e4)
        params = SamplingParams(max_new_tokens=100, threshold=1.0, temperature=0.0, student_temperature=0.0,
                                ignore_eos=True)
        result = engine.generate_batch(["The answer is"], params)[0]
        engine.student.logits = real
        teacher_len = len(engine.space.to_teacher(result.prompt_token_ids + result.token_ids))
        assert result.finish_reason == "length" and set(result.token_ids) == {extra}
        assert max_seq_len - pieces < teacher_len <= max_seq_len, (max_seq_len, teacher_len, pieces)
        engine.score_batch([result.prompt_token_ids], [result.token_ids])  # fits, as generated


def test_score_batch_names_the_position_of_a_completion_token_outside_the_space(tiny_pair):
    """An id of the student's vocabulary that the teacher's tokenizer spells otherwise (left out of the space)."""
    engine = Engine(*tiny_pair, device="cpu", max_batch_size=1, max_seq_len=32, sampler="reference")
    engine.space._shared[300] = False
    engine.space.unmapped[300] = "the tokenizers spell it differently"
    with pytest.raises(ValueError, match=r"completion 0: token 4 \(id 300\) has no equivalent .*spell it differently"):
        engine.score_batch([[3, 4]], [[5, 6, 7, 8, 300]])


def _student_with_eos(folder, tokenizer_dir, token: str) -> Path:
    """A student whose only EOS (config and generation config) is its own added special token `token`."""
    import json

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer.add_special_tokens([token])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=token,
                            pad_token="<|endoftext|>").save_pretrained(str(folder / "tok"))
    student = build_model(folder / "student", "qwen3", tokenizer_dir=folder / "tok", hidden_size=48)
    eos = load_tokenizer(student).convert_tokens_to_ids(token)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((student / name).read_text())
        (student / name).write_text(json.dumps({**config, "eos_token_id": eos}))
    return student


def test_a_student_that_could_never_write_its_eos_is_refused(tmp_path, tiny_tokenizer_dir):
    """A ChatML-tuned student's <|eot|> added past the last row of a teacher without padding rows is outside
    the token space: the student could never end a trace itself, and every request waiting for its EOS would
    run to max_new_tokens. Such requests are refused; ignore_eos ones (benchmarks) run."""
    student = _student_with_eos(tmp_path, tiny_tokenizer_dir, "<|eot|>")
    teacher = build_model(tmp_path / "teacher", "qwen2", tokenizer_dir=tiny_tokenizer_dir, hidden_size=48,
                          vocab_size=len(load_tokenizer(tiny_tokenizer_dir)))
    engine = Engine(teacher, student, device="cpu", max_batch_size=1, max_seq_len=32, sampler="reference")
    eot = engine.tokenizer.eos_token_id
    with pytest.raises(ValueError, match=rf"request 0: the student could never end a trace: none of its EOS ids is a "
                                         rf"token it may write here \(id {eot}: student id {eot} is past the "
                                         rf"teacher's last embedding row.*\)\. To write it, give the teacher "
                                         rf"embedding rows up to it; or set ignore_eos"):  # (token_map cannot)
        engine.generate_batch(["The answer is"], SamplingParams(max_new_tokens=4))
    result = engine.generate_batch(["The answer is"], SamplingParams(max_new_tokens=4, ignore_eos=True))[0]
    assert len(result.token_ids) == 4


def test_a_mapped_eos_at_max_seq_len_still_ends_the_trace(tmp_path, tiny_tokenizer_dir):
    """An EOS mapped to teacher tokens ends its request: the teacher never reads its pieces, so they need no
    room, and the trace ends with "eos" however close to max_seq_len."""
    student = _student_with_eos(tmp_path, tiny_tokenizer_dir, "<extra>")
    teacher = build_model(tmp_path / "teacher", "qwen2", tokenizer_dir=tiny_tokenizer_dir, hidden_size=48, seed=5)
    for max_seq_len in range(5, 12):
        engine = Engine(teacher, student, device="cpu", max_batch_size=1, max_seq_len=max_seq_len,
                        sampler="reference")
        eos = engine.tokenizer.eos_token_id
        assert len(engine.space.teacher_pieces[eos]) > 1
        real = engine.student.logits
        engine.student.logits = lambda hidden: real(hidden).index_fill(-1, torch.tensor([eos]), 1e4)
        params = SamplingParams(max_new_tokens=5, threshold=1.0, temperature=0.0, student_temperature=0.0)
        result = engine.generate_batch(["The answer is"], params)[0]
        assert (result.finish_reason, result.token_ids) == ("eos", [eos]), max_seq_len
        _scored_as_generated(engine, result)


@pytest.mark.parametrize("ending", ["stop_string", "max_new_tokens"])
def test_a_mapped_token_that_ends_its_request_is_kept_at_max_seq_len(mapped_pair, ending):
    """A mapped token that ends the request (a stop string, the last of max_new_tokens) is kept however close to
    max_seq_len: the teacher never reads its pieces."""
    for max_seq_len in range(6, 10):
        engine = Engine(*mapped_pair, device="cpu", max_batch_size=1, max_seq_len=max_seq_len, sampler="reference")
        extra = engine.tokenizer.convert_tokens_to_ids("<extra>")
        real = engine.student.logits
        engine.student.logits = lambda hidden: real(hidden).index_fill(-1, torch.tensor([extra]), 1e4)
        stop = dict(stop=["<extra>"], max_new_tokens=5) if ending == "stop_string" else dict(max_new_tokens=1)
        params = SamplingParams(threshold=1.0, temperature=0.0, student_temperature=0.0, ignore_eos=True, **stop)
        result = engine.generate_batch(["The answer is"], params)[0]
        expected = "stop" if ending == "stop_string" else "length"
        assert (result.finish_reason, result.token_ids) == (expected, [extra]), max_seq_len
        _scored_as_generated(engine, result)


def _scored_as_generated(engine, result):
    """The engine's own score_batch takes the trace it wrote (it refused one whose last token's teacher pieces
    pass max_seq_len): that token, which the teacher never read, has a NaN teacher log-prob, and every log-prob
    the steps gave is the score's."""
    (scored,) = engine.score_batch([result.prompt_token_ids], [result.token_ids])
    teacher_len = len(engine.space.to_teacher(result.prompt_token_ids + result.token_ids))
    assert math.isnan(scored.teacher_logprobs[-1]) == (teacher_len > engine.max_seq_len)
    assert not any(math.isnan(x) for x in scored.teacher_logprobs[:-1] + scored.student_logprobs)
    for step, score in ((result.teacher_logprobs, scored.teacher_logprobs),
                        (result.student_logprobs, scored.student_logprobs)):
        given = [j for j, x in enumerate(step) if not math.isnan(x)]
        assert [step[j] for j in given] == pytest.approx([score[j] for j in given], abs=1e-4)


def test_the_samplers_masks_are_padded_to_a_multiple_of_16_with_the_same_law(tiny_pair):
    """Compiled Triton kernels specialise a mask length divisible by 16, and only then load the logits in vectors
    (Qwen3's 151,669 ids: scalar loads, spills; bench/kernel_resources.py). Padding with absent ids, up to the
    narrower logits, changes no law: the same tokens and log-probs from every backend."""
    from rsd_engine.randomness import step_uniforms
    from rsd_engine.sampling import RowParams, rsd_sample
    from rsd_engine.tokens import TokenSpace

    space = TokenSpace(151_669, torch.ones(151_669, dtype=torch.bool), torch.ones(151_669, dtype=torch.bool))
    proposal, fallback = space.sampler_masks(151_936)
    assert proposal.numel() == fallback.numel() == 151_680 and not proposal[151_669:].any()
    assert space.sampler_masks(151_670)[0].numel() == 151_670  # never past the logits
    engine = Engine(*tiny_pair, device="cpu", max_batch_size=1, max_seq_len=32, sampler="reference")
    assert [m.numel() for m in engine.sampler_masks] == [464, 464] and engine.space.size == 455
    generator = torch.Generator().manual_seed(0)
    teacher, student = (torch.randn(6, 512, generator=generator) * 3 for _ in range(2))
    params = RowParams(*(torch.full((6,), v, dtype=torch.int32 if isinstance(v, int) else torch.float32)
                         for v in (0.7, 0, 0.95, 0.01, 1.0, 0.7, 0, 0.95, 1)))
    uniforms = step_uniforms(torch.arange(6), torch.zeros(6, dtype=torch.long))
    for backend in ("reference", "cpp", "triton"):  # (triton: under the interpreter here)
        unpadded, padded = (rsd_sample(teacher, student, uniforms, params, *masks, backend=backend)
                            for masks in ((engine.space.proposal_mask, engine.space.fallback_mask),
                                          engine.sampler_masks))
        assert all(torch.equal(a, b) for a, b in zip(unpadded, padded)), backend


def test_tokenizers_too_different(tmp_path, tiny_pair):
    tok = load_tokenizer(tiny_pair[0])
    vocab = tok.get_vocab()
    shuffled = {t: (i * 7 + 3) % len(vocab) for t, i in vocab.items()}  # same tokens, other ids
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(shuffled, unk_token="<|endoftext|>")))
    with pytest.raises(ValueError, match=r"share only \d+ of the student's \d+ token ids.*First mismatches: id 0"):
        align_token_spaces(tok, other, teacher_rows=512, student_rows=512)


def test_too_few_shared_ids_names_mismatches_past_the_teachers_rows(tiny_tokenizer_dir):
    """A student tokenizer extending the teacher's (no teacher padding rows) differs only past the teacher's ids."""
    teacher_tok = load_tokenizer(tiny_tokenizer_dir)
    student_tok = with_added(tiny_tokenizer_dir, *(f"<x{k}>" for k in range(100)))
    with pytest.raises(ValueError, match=r"First mismatches: id 455: student '<x0>' past the teacher's rows; id 456"):
        align_token_spaces(teacher_tok, student_tok, teacher_rows=len(teacher_tok), student_rows=576)


def test_token_map_must_name_student_only_tokens(tiny_pair):
    tok = load_tokenizer(tiny_pair[0])
    with pytest.raises(ValueError, match="token_map names"):
        align_token_spaces(tok, tok, teacher_rows=512, student_rows=512, token_map={"<nope>": "x"})


def test_prompt_ids_outside_the_shared_space_are_refused(tiny_pair):
    engine = Engine(*tiny_pair, device="cpu", max_batch_size=1, max_seq_len=32, sampler="reference")
    with pytest.raises(ValueError, match=r"prompt 0: token 1 \(id 500\) has no equivalent"):
        engine.generate_batch([[3, 500]], SamplingParams(max_new_tokens=2))
    # a student-only token the space could not hold: the error says why (align_token_spaces' reason)
    engine.space.unmapped[500] = "student id 500 is past the teacher's last embedding row"
    with pytest.raises(ValueError, match=r"id 500\) has no equivalent .*\(student id 500 is past the teacher's"):
        engine.generate_batch([[3, 500]], SamplingParams(max_new_tokens=2))


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        load_tokenizer(tmp_path)


def test_ordinary_student_tokens_the_teacher_has_elsewhere_are_named(tmp_path, tiny_tokenizer_dir):
    """A teacher tokenizer with fewer merges shares 98% of the student's ids: the student's other ordinary tokens
    were left out of its fallback silently (only added tokens are mapped). They are named, once, and each says why."""
    teacher_dir = build_tokenizer(tmp_path / "teacher_tok", vocab_size=445)
    teacher, student = load_tokenizer(teacher_dir), load_tokenizer(tiny_tokenizer_dir)
    with pytest.warns(UserWarning, match=r"5 of the student's ordinary tokens sit at ids where the teacher has other "
                                         r"tokens \(id 445: teacher"):
        space = align_token_spaces(teacher, student, teacher_rows=512, student_rows=512)
    assert not space.fallback_mask[445:450].any()
    assert "only added tokens are mapped" in space.unmapped[445]


def test_teacher_tokens_outside_the_space_are_named(tiny_tokenizer_dir):
    """A teacher token the student lacks (Qwen3's <think> against a Qwen2.5 student; an R1 distill's EOS against
    Qwen3) can never be proposed: its probability went to the other tokens silently. Named, its EOS first."""
    student = load_tokenizer(tiny_tokenizer_dir)
    teacher = with_added(tiny_tokenizer_dir, "<extra>", "<stop>", special=True)
    teacher.eos_token = "<stop>"
    with pytest.warns(UserWarning, match=r"^2 of the teacher's tokens are outside the token space both models share "
                                         r"\('<stop>' \(id 456\), '<extra>' \(id 455\)\): the teacher can never "
                                         r"propose them, .*its EOS token '<stop>' is one of them"):
        align_token_spaces(teacher, student, teacher_rows=512, student_rows=512)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a teacher whose tokens the student all has: nothing to say
        align_token_spaces(student, teacher, teacher_rows=512, student_rows=512)


def test_student_tokens_outside_the_space_are_named():
    """A student-only added token the teacher cannot read (an unknown-token piece) and ordinary tokens past the
    teacher's last row were left out of the fallback silently (the latter with no reason either): named."""
    teacher, student = sentencepiece_like(), sentencepiece_like("<think>")
    with pytest.warns(UserWarning, match=r"^1 of the student's tokens are outside the token space both models share, "
                                         r"so the student can never write them .*: '<think>' \(id 400\) \(id "
                                         r"400: student-only token '<think>' is not mapped: .*unknown token"):
        align_token_spaces(teacher, student, teacher_rows=448, student_rows=448)
    with pytest.warns(UserWarning, match=r"^40 of the student's tokens are outside .*: '.*' \(id 360\), .*, \.\.\. "
                                         r"\(id 360: student id 360 is past the teacher's last embedding row"):
        space = align_token_spaces(teacher, teacher, teacher_rows=360, student_rows=448)
    assert "past the teacher's last embedding row" in space.unmapped[399]


@pytest.mark.parametrize("declares, named", [
    ({"auto_map": {"AutoTokenizer": ["tok.MyTok", None]}, "tokenizer_class": "MyTok"},
     r"auto_map \(AutoTokenizer: tok.MyTok\) and tokenizer_class 'MyTok', which transformers does not provide"),
    ({"auto_map": ["tok.MyTok", None]}, r"auto_map \(AutoTokenizer: tok.MyTok\)"),  # the older list form
    ({"tokenizer_class": "MyTok"}, r"tokenizer_class 'MyTok', which transformers does not provide"),
])
def test_custom_tokenizer_code_is_never_run_and_named(tmp_path, tiny_pair, tiny_tokenizer_dir, declares, named):
    """A model folder whose tokenizer_config.json names its own tokenizer code (auto_map, or a class transformers
    lacks) was loaded silently as a generic tokenizer, which may split text otherwise than that code: a warning now,
    as config.json's auto_map gets one (models/config.py). The code itself is still never run."""
    folder = shutil.copytree(tiny_pair[1], tmp_path / "tok")
    ran = tmp_path / "ran"
    (folder / "tok.py").write_text(f"open({str(ran)!r}, 'w').write('x')\n"
                                   "from transformers import PreTrainedTokenizerFast\n"
                                   "class MyTok(PreTrainedTokenizerFast): pass\n")
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **declares}))
    with pytest.warns(UserWarning, match=rf"^{re.escape(str(path))} has {named} \(custom tokenizer code, never run "
                                         rf"here\): the tokenizer is read from tokenizer.json as is, by the built-in "
                                         rf"TokenizersBackend; if its own code tokenizes otherwise, so will this$"):
        tok = load_tokenizer(folder)
    assert not ran.exists()
    text = "The answer is \\boxed{42}."
    assert tok.encode(text) == load_tokenizer(tiny_tokenizer_dir).encode(text)


def test_built_in_tokenizer_classes_are_not_named(tiny_tokenizer_dir):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*custom tokenizer code")
        load_tokenizer(tiny_tokenizer_dir)


def test_custom_tokenizer_code_transformers_needs_is_refused(tmp_path, tiny_tokenizer_dir):
    """Without a config.json to read the model type from, transformers wants the folder's code: refused, never run."""
    folder = shutil.copytree(tiny_tokenizer_dir, tmp_path / "tok")
    ran = tmp_path / "ran"
    (folder / "tok.py").write_text(f"open({str(ran)!r}, 'w').write('x')\n")
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "tokenizer_class": "MyTok",
                                "auto_map": {"AutoTokenizer": ["tok.MyTok", None]}}))
    with pytest.raises(ValueError, match=r"without running the folder's own code, which rsd-engine never does"):
        load_tokenizer(folder)
    assert not ran.exists()
