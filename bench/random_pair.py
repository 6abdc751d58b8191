"""A random teacher/student pair at realistic shapes, built offline for benchmarks.

Shapes named "qwen3-*" are the released Qwen3 models' (151,936 logit rows, head_dim 128); on a CUDA
device their random bf16 weights are made on the card (seconds, where CPU init of an 8B model takes
minutes) and written as safetensors, which the Engine reads as it reads any model folder."""
from __future__ import annotations

import json
from pathlib import Path

import torch

SHAPES = {
    # about 123M parameters (tied 49k embeddings + 12 layers of 768)
    "teacher": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                    intermediate_size=2048),
    # about 30M parameters
    "student": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                    intermediate_size=1024),
    # about 11M parameters, a tenth of the teacher's work per token (mostly the 49k x 192 head)
    "student-small": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, num_key_value_heads=1,
                          intermediate_size=512),
    # a few-MB pair for dry runs of the benchmark plumbing (bench/device_check.sh --cpu-dry-run)
    "teacher-tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=256),
    "student-tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1,
                         intermediate_size=128),
    # The released Qwen3 shapes (config.json of Qwen/Qwen3-0.6B, -1.7B, -8B): 151,936 logit rows each.
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       intermediate_size=3072, head_dim=128, vocab_rows=151_936),
    "qwen3-1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       intermediate_size=6144, head_dim=128, vocab_rows=151_936),
    "qwen3-8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=12288, head_dim=128, vocab_rows=151_936, tie_word_embeddings=False),
}
PADDING_ROWS = 64  # logit rows past the tokenizer; the last one is the EOS id, so no request stops early


def word_tokenizer(folder: Path, vocab_size: int):
    """A word-level tokenizer with ``vocab_size`` tokens "w0", "w1", ... and no EOS (runs last to the end)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 1)}
    vocab["<unk>"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)


def build_random_pair(root, *, vocab_size: int = 49152, seed: int = 0, student: str = "student",
                      teacher: str = "teacher", device: str = "cpu") -> tuple[Path, Path]:
    """Qwen3-style teacher and student folders under ``root`` (cached: built once); ``teacher`` and
    ``student`` name their shapes in SHAPES. A shape with ``vocab_rows`` fixes its logit rows (the
    tokenizer then has vocab_rows - PADDING_ROWS words, whatever ``vocab_size`` says); the others have
    ``vocab_size`` words and ``vocab_size + PADDING_ROWS`` rows. On ``device="cuda"`` the weights are
    made on the card in bfloat16."""
    rows = {SHAPES[name].get("vocab_rows", vocab_size + PADDING_ROWS) for name in (teacher, student)}
    if len(rows) != 1:
        raise ValueError(f"{teacher} and {student} have different vocabularies ({sorted(rows)} logit rows)")
    rows = rows.pop()
    root = Path(root)
    folders = []
    for i, name in enumerate((teacher, student)):
        folder = root / f"{name}-v{rows - PADDING_ROWS}-s{seed}"
        folders.append(folder)
        if not (folder / "params.json").exists():  # written last: a folder without it is half-built
            _build(folder, name, rows, seed + i, device)
    return folders[0], folders[1]


def _build(folder: Path, name: str, rows: int, seed: int, device: str):
    from transformers import AutoModelForCausalLM, Qwen3Config

    shape = {k: v for k, v in SHAPES[name].items() if k != "vocab_rows"}
    shape = {"head_dim": 64, "tie_word_embeddings": True, **shape}
    config = Qwen3Config(vocab_size=rows, max_position_embeddings=4096, eos_token_id=rows - 1, **shape)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder, safe_serialization=True)
    word_tokenizer(folder, rows - PADDING_ROWS)
    (folder / "params.json").write_text(json.dumps({"shape": name, "dtype": str(dtype),
                                                    "parameters": sum(p.numel() for p in model.parameters())}))
    del model
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def weight_bytes(folder: Path) -> int:
    """Bytes of a model folder's weights as stored (a tied head is stored once): what a decode step reads."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
