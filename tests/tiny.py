"""Tiny tokenizers and models that tests build for themselves (nothing is downloaded).

build_tokenizer: a deterministic byte-level BPE (~450 tokens) over a small English + maths corpus, with
Qwen-style special tokens appended after the BPE vocabulary (so extra special tokens never shift the
ids of the others). build_model: a randomly initialised HF Llama / Qwen2 / Qwen3 checkpoint saved
with safetensors, with the tokenizer files copied in.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
BPE_VOCAB_SIZE = 450  # 256 byte symbols + merges
FINAL_NORM_SCALE = 4.0  # so that sampling tests see peaked next-token distributions

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)

CORPUS = r"""
The answer is \boxed{42}. The answer is \boxed{7}. The final answer is \boxed{12}.
Let x be a number such that 2x + 3 = 11. Then 2x = 8, so x = 4. The answer is \boxed{4}.
We compute 12 * 12 = 144 and 144 - 44 = 100. Therefore the answer is \boxed{100}.
What is the sum of the first 10 positive integers? The sum is 10 * 11 / 2 = 55.
If a triangle has sides 3, 4 and 5, then it is a right triangle because 9 + 16 = 25.
Solve for y: 5y - 15 = 0. Adding 15 to both sides gives 5y = 15, so y = 3.
The probability of rolling a 6 on a fair die is 1/6. The probability of two sixes is 1/36.
Wait, let me check this again. First, we note that the number is even. Second, it is divisible by 3.
So the number is divisible by 6. Let me think step by step about the problem.
The area of a circle with radius r is pi r^2, and the circumference is 2 pi r.
Okay, so we need to find the value of f(2) where f(x) = x^2 + 2x + 1 = (x + 1)^2. Then f(2) = 9.
Hmm, that does not look right. Let me try a different approach to the question.
The square root of 81 is 9, and the cube root of 27 is 3. So 9 + 3 = 12.
Alice has 5 apples and Bob gives her 8 more. Now she has 13 apples in total.
A train travels 60 miles per hour for 3 hours, so it covers 180 miles.
The derivative of x^3 is 3x^2, and the integral of 2x is x^2 + C.
In the equation a + b = 10 with a - b = 2, we get a = 6 and b = 4.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 50 75 99 100 1000
The question asks for the smallest prime greater than 20, which is 23.
Therefore, the total is 3 + 5 + 7 = 15, and the answer is \boxed{15}.
Because the function is increasing, its minimum on the interval is at the left end point.
We are given that the ratio of boys to girls is 3 : 2 and there are 30 students, so 18 are boys.
"""


def _corpus_lines() -> list[str]:
    lines = [line for line in CORPUS.strip().splitlines() if line]
    return lines * 4


def build_tokenizer(folder, *, extra_special_tokens=(), vocab_size=BPE_VOCAB_SIZE) -> Path:
    """Train and save the tiny tokenizer in `folder`; AutoTokenizer.from_pretrained(folder) loads it.
    Another vocab_size gives a tokenizer that splits the same text differently."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_corpus_lines(), trainer)
    # Added after training, so special tokens take the last ids, as in Qwen's vocabularies.
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS) + list(extra_special_tokens))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(str(folder))
    return folder


def build_model(folder, arch="qwen3", *, tokenizer_dir=None, vocab_size=None, hidden_size=64, num_layers=2,
                num_heads=4, num_kv_heads=2, intermediate_size=128, tie_word_embeddings=False,
                rope_scaling=None, seed=0, dtype=torch.float32, shards=1, head_dim=None) -> Path:
    """Save a randomly initialised HF checkpoint (safetensors) plus tokenizer files in `folder`.

    vocab_size defaults to the tokenizer's length rounded up to a multiple of 64 (so the embedding has
    padding rows, as real checkpoints do). rope_scaling, e.g. {"rope_type": "llama3", "factor": 8.0,
    "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}.
    head_dim defaults to hidden_size / num_heads; Qwen3's own are wider (Qwen3-0.6B: 1024 / 16 heads, head_dim 128).
    """
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        build_tokenizer(folder)
    else:
        for path in Path(tokenizer_dir).iterdir():
            if path.name.startswith(("tokenizer", "special_tokens", "chat_template", "added_tokens")):
                shutil.copy(path, folder / path.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    if vocab_size is None:
        vocab_size = math.ceil(len(tokenizer) / 64) * 64
    config_classes = {"qwen3": transformers.Qwen3Config, "qwen2": transformers.Qwen2Config,
                      "llama": transformers.LlamaConfig}
    if arch not in config_classes:
        raise ValueError(f"arch must be one of {', '.join(config_classes)}, got {arch!r}")
    config = config_classes[arch](
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim or hidden_size // num_heads, max_position_embeddings=2048, rms_norm_eps=1e-6,
        initializer_range=0.1, tie_word_embeddings=tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, **(rope_scaling or {})},
        bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # HF initialises biases to 0 and norm weights to 1; randomise them so that loading them wrongly shows.
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif "norm" in name:
                param.uniform_(0.8, 1.2)
        # Logits ~4x wider: next-token entropy ~2.5 nats instead of ~5.9 (near uniform over 512).
        model.model.norm.weight.mul_(FINAL_NORM_SCALE)
    model = model.to(dtype)
    max_shard_size = "50GB"
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        max_shard_size = math.ceil(total / shards)
    model.save_pretrained(str(folder), max_shard_size=max_shard_size)
    return folder
