"""A tiny teacher and student that have learned to answer four problems (pipeline tests).

Both are tiny Qwen3 models (tiny.py) trained until each memorised completion token has
probability > 0.97 after its prompt, so top-p 0.95 sampling keeps only that token and the traces
are known in advance whatever the seed. The problems cover every status:

    add       reference 4,  answers \\boxed{4}                -> solved
    mul       reference 9,  answers \\boxed{8}                -> prefix (wrong answer)
    open      no reference, answers \\boxed{7}                -> unverified
    unclosed  reference 5,  answers \\boxed{5} but never closes </think>  -> prefix
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tiny import build_model, build_tokenizer

SYSTEM = "Box the answer."
PROBLEMS = [
    {"id": "add", "question": "What is 2+2?", "answer": "4",
     "completion": "Two and two.</think>\nThe answer is \\boxed{4}."},
    {"id": "mul", "question": "What is 3*3?", "answer": "9",
     "completion": "Three threes.</think>\nThe answer is \\boxed{8}."},
    {"id": "open", "question": "Name a prime.", "answer": None,
     "completion": "Small one.</think>\nThe answer is \\boxed{7}."},
    {"id": "unclosed", "question": "What is 5+0?", "answer": "5",
     "completion": "The answer is \\boxed{5}."},
]
MIN_PROB = 0.97


def solver_pair(root: Path) -> tuple[Path, Path]:
    """(teacher_dir, student_dir), built and trained once under `root`."""
    root = Path(root)
    done = root / "done"
    if not done.exists():
        tokenizer_dir = build_tokenizer(root / "tokenizer")
        teacher = build_model(root / "teacher", "qwen3", tokenizer_dir=tokenizer_dir, hidden_size=96, num_layers=2,
                              num_heads=4, num_kv_heads=2, intermediate_size=192, seed=1)
        student = build_model(root / "student", "qwen3", tokenizer_dir=tokenizer_dir, hidden_size=64, num_layers=2,
                              num_heads=4, num_kv_heads=2, intermediate_size=128, seed=2)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matrices: a second thread only adds waiting on a busy machine
        try:
            for folder in (teacher, student):
                _train(folder)
        finally:
            torch.set_num_threads(threads)
        done.write_text("ok")
    return root / "teacher", root / "student"


def write_problems(path: Path, extra_rows=()) -> Path:
    rows = [{k: p[k] for k in ("id", "question", "answer") if p[k] is not None} for p in PROBLEMS]
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, *extra_rows]))
    return path


def _train(folder: Path, max_steps: int = 600):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rsd_engine.pipeline.prompts import build_prompt

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    rows = []
    for p in PROBLEMS:
        prompt = tokenizer.encode(build_prompt(tokenizer, p["question"], SYSTEM).text, add_special_tokens=False)
        completion = tokenizer.encode(p["completion"] + tokenizer.eos_token, add_special_tokens=False)
        rows.append((prompt, completion))
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        seq = prompt + completion
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(prompt): len(seq)] = torch.tensor(completion)
        mask[i, : len(seq)] = 1
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(max_steps):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if step % 20 == 19 and _min_target_prob(out.logits.detach(), labels) > MIN_PROB:
            break
    model.eval()
    with torch.no_grad():
        final = _min_target_prob(model(input_ids=ids, attention_mask=mask).logits, labels)
    assert final > MIN_PROB, f"{folder.name} did not learn its answers (min target prob {final:.3f})"
    model.save_pretrained(str(folder))


def _min_target_prob(logits, labels) -> float:
    probs = torch.softmax(logits[:, :-1].float(), -1)
    targets = labels[:, 1:]
    keep = targets != -100
    return probs.gather(-1, targets.clamp_min(0)[..., None])[..., 0][keep].min().item()
