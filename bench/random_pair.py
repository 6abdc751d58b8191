"""A random teacher/student pair at realistic shapes, built offline for benchmarks."""
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
}


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
                      teacher: str = "teacher") -> tuple[Path, Path]:
    """Qwen3-style teacher and student folders under ``root`` (cached: built once); ``teacher`` and
    ``student`` name their shapes in SHAPES."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    root = Path(root)
    folders = []
    for i, name in enumerate((teacher, student)):
        shape = SHAPES[name]
        folder = root / f"{name}-v{vocab_size}-s{seed}"
        folders.append(folder)
        if (folder / "config.json").exists():
            continue
        # The EOS id is a padding row past the tokenizer, so generation always runs to max_new_tokens.
        config = Qwen3Config(vocab_size=vocab_size + 64, head_dim=64, tie_word_embeddings=True,
                             max_position_embeddings=4096, eos_token_id=vocab_size + 63, **shape)
        torch.manual_seed(seed + i)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(folder, safe_serialization=True)
        word_tokenizer(folder, vocab_size)
        (folder / "params.json").write_text(json.dumps({"parameters": sum(p.numel() for p in model.parameters())}))
    return folders[0], folders[1]
