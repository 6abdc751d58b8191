"""Convert a llama.cpp GGUF file into a local HF-style model folder.

convert_gguf reads a Llama-architecture GGUF with a byte-level BPE ("gpt2") tokenizer,
dequantises every tensor (Q4_1, Q8_0, F16, F32, or any type `gguf.quants` knows), undoes
llama.cpp's q/k row permutation and writes config.json (LlamaForCausalLM), model.safetensors
and the tokenizer files, with source.json naming the GGUF file it came from (size and SHA-256) and the
storage dtype (gguf_source), so a cache can tell a folder of another file from its own. The folder appears
all at once (built beside it, then renamed), so a killed conversion never leaves half a model behind.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

GGUF_TO_HF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_TO_HF_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

# llama.cpp's pre-tokenizer names, grouped by the split they stand for.
_GPT2_PRE = {None, "default", "gpt-2", "gpt2", "mpt", "olmo", "jais"}
_DIGITS_THEN_GPT2_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_LLAMA3_PRE = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"}
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_TOKEN_ID_KEYS = {"unk": "unknown", "pad": "padding"}
STALE_TMP_SECONDS = 3600
SOURCE_FILE = "source.json"


def gguf_source(gguf_path, dtype=torch.bfloat16) -> dict:
    """What convert_gguf writes to source.json: the GGUF file's name, size and SHA-256, and the dtype."""
    gguf_path = Path(gguf_path)
    digest = hashlib.sha256()
    with open(gguf_path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return {"gguf": gguf_path.name, "bytes": gguf_path.stat().st_size, "sha256": digest.hexdigest(),
            "dtype": str(dtype).removeprefix("torch.")}


def convert_gguf(gguf_path, out_dir, *, dtype=torch.bfloat16, overwrite=False) -> Path:
    """Write `out_dir` (config.json, model.safetensors, tokenizer files, source.json) from a GGUF file.

    dtype: storage dtype of the weights (bfloat16 halves the folder; float32 keeps the
    dequantised values exactly). An existing `out_dir` is an error unless overwrite=True.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it")
    reader = _open_reader(gguf_path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    architecture = meta.get("general.architecture")
    if architecture != "llama":
        raise ValueError(f"{gguf_path}: architecture {architecture!r} is not supported (only 'llama')")
    tensors = {t.name: t for t in reader.tensors}
    config = llama_config(meta, tied="output.weight" not in tensors, dtype=dtype)
    weights = llama_weights(tensors, config, dtype)
    tokenizer = build_tokenizer(meta)
    source = gguf_source(gguf_path, dtype)
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(config), indent=2) + "\n")
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(tmp))
        _portable_tokenizer_class(tmp / "tokenizer_config.json")
    return out_dir


def _portable_tokenizer_class(path: Path) -> None:
    # transformers 5 writes its own class name, which transformers 4 cannot resolve; both read this one.
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _open_reader(gguf_path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ImportError("reading GGUF files needs the gguf package: `pip install gguf`") from None

    try:
        return GGUFReader(str(gguf_path))
    except Exception as exc:  # the reader raises assorted errors on non-GGUF bytes
        raise ValueError(f"{gguf_path} is not a readable GGUF file: {exc}") from exc


def _required(meta: dict, key: str):
    if key not in meta:
        raise ValueError(f"GGUF metadata lacks {key!r}, which a Llama conversion needs")
    return meta[key]


def llama_config(meta: dict, *, tied: bool, dtype=torch.bfloat16) -> dict:
    """LlamaForCausalLM config.json contents from the GGUF `llama.*` metadata."""
    hidden = int(_required(meta, "llama.embedding_length"))
    heads = int(_required(meta, "llama.attention.head_count"))
    kv_heads = int(meta.get("llama.attention.head_count_kv", heads))
    head_dim = int(meta.get("llama.attention.key_length", meta.get("llama.rope.dimension_count", hidden // heads)))
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ValueError(f"rope scaling {scaling!r} is not supported by the GGUF importer (only none)")
    rope_theta = float(meta.get("llama.rope.freq_base", 10000.0))
    tokens = _required(meta, "tokenizer.ggml.tokens")
    eos = [int(_required(meta, "tokenizer.ggml.eos_token_id"))]
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None and int(eot) not in eos:
        eos.append(int(eot))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(meta.get("llama.vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(_required(meta, "llama.feed_forward_length")),
        "num_hidden_layers": int(_required(meta, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        "rms_norm_eps": float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    return config


def _generation_config(config: dict) -> dict:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: config[k] for k in keys if config[k] is not None}


def llama_weights(tensors: dict, config: dict, dtype) -> dict[str, torch.Tensor]:
    """HF-named, dequantised weights; q/k rows back in HF's rotary layout."""
    from gguf.quants import dequantize

    layers = config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    expected = {name for name in GGUF_TO_HF_GLOBAL if name != "output.weight" or not config["tie_word_embeddings"]}
    expected |= {f"blk.{i}.{part}.weight" for i in range(layers) for part in GGUF_TO_HF_LAYER}
    missing, unknown = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or unknown:
        raise ValueError(
            f"GGUF tensors do not match a {layers}-layer Llama: missing {missing[:5]}, unsupported {unknown[:5]}"
        )
    for name in ("token_embd.weight", "output.weight"):
        rows = int(tensors[name].shape[-1]) if name in tensors else config["vocab_size"]  # GGUF: (cols, rows)
        if rows != config["vocab_size"]:
            raise ValueError(f"GGUF tensor {name} has {rows} rows where the metadata's vocabulary has "
                             f"{config['vocab_size']} tokens; the file is inconsistent")
    weights = {}
    for name, tensor in tensors.items():
        try:
            # a copy: F32 tensors come back as read-only views of the memory-mapped file
            array = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        except NotImplementedError as exc:
            raise ValueError(f"tensor {name}: GGUF type {tensor.tensor_type.name} cannot be dequantised") from exc
        if name.endswith("attn_q.weight"):
            array = unpermute_rotary_rows(array, heads)
        elif name.endswith("attn_k.weight"):
            array = unpermute_rotary_rows(array, kv_heads)
        weights[_hf_name(name)] = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
    return weights


def _hf_name(gguf_name: str) -> str:
    if gguf_name in GGUF_TO_HF_GLOBAL:
        return GGUF_TO_HF_GLOBAL[gguf_name]
    _, layer, part, suffix = gguf_name.split(".")
    return f"model.layers.{layer}.{GGUF_TO_HF_LAYER[part]}.{suffix}"


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's converter permutation of q/k projection rows.

    llama.cpp interleaves each head's two rotary halves row by row (pairs (i, i + d/2) become
    rows 2i, 2i+1); HF keeps the halves contiguous. Copying rows straight gives a model that runs
    and is wrong.
    """
    rows, cols = weight.shape
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _pre_tokenizer(pre: str | None):
    from tokenizers import Regex, pre_tokenizers

    if pre in _GPT2_PRE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2_PRE:
        # llama.cpp splits every digit off first, then applies the GPT-2 regex.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _LLAMA3_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    known = sorted(p for p in _GPT2_PRE | _DIGITS_THEN_GPT2_PRE | _LLAMA3_PRE if p)
    raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; known: {known}")


def build_tokenizer(meta: dict):
    """A transformers fast tokenizer equivalent to the GGUF's byte-level BPE tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = list(_required(meta, "tokenizer.ggml.tokens"))
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF token list has duplicate tokens; cannot build a BPE vocabulary")
    merges = [tuple(m.split(" ")) for m in _required(meta, "tokenizer.ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise ValueError("GGUF merges must be 'left right' pairs")
    pre = meta.get("tokenizer.ggml.pre")
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, ignore_merges=pre in _LLAMA3_PRE))
    tokenizer.pre_tokenizer = _pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    )

    def token(key):
        index = meta.get(f"tokenizer.ggml.{_TOKEN_ID_KEYS.get(key, key)}_token_id")
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    bos = token("bos")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    specials = {f"{k}_token": token(k) for k in ("bos", "eos", "unk", "pad")}
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=int(meta.get("llama.context_length", 2048)),
        **{k: v for k, v in specials.items() if v is not None},
    )
    template = meta.get("tokenizer.chat_template")
    if template:
        wrapped.chat_template = template
    return wrapped


def sweep_stale(out_dir) -> None:
    """Remove the temporary folders of `out_dir` that a process killed mid-conversion left (kill -9 skips
    atomic_folder's cleanup): those older than an hour, far longer than a conversion takes."""
    out_dir = Path(out_dir)
    for stale in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.tmp-*"):
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(out_dir, *, overwrite=False):
    """Yield a temporary folder beside `out_dir`; on success it becomes `out_dir` in one rename.

    If another process finished the same folder first (two torchrun ranks warming one cache),
    theirs is kept and ours dropped. On error or kill, `out_dir` is untouched.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        if overwrite and out_dir.exists():
            shutil.rmtree(out_dir)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not out_dir.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
