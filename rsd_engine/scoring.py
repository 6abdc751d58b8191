"""Teacher forcing: the log-probability of every token of a sequence given the tokens before it."""
from __future__ import annotations

import torch

CHUNK = 512  # positions per forward: bounds the [chunk, vocab] logits held at once


@torch.inference_mode()
def teacher_forced_logprobs(model, cache, seq: list[int]) -> list[float]:
    """``out[q] = log p(seq[q + 1] | seq[: q + 1])`` under ``model``, using slot 0 of ``cache``."""
    device = model.device
    slot = torch.zeros(1, dtype=torch.long, device=device)
    out: list[float] = []
    for start in range(0, len(seq) - 1, CHUNK):
        chunk = seq[start: start + CHUNK]
        targets = torch.tensor(seq[start + 1: start + len(chunk) + 1], device=device)
        positions = torch.arange(start, start + len(chunk), device=device)[None]
        hidden = model(torch.tensor([chunk], device=device), positions, cache, slot, start + len(chunk))
        logprobs = torch.log_softmax(model.logits(hidden[0, : len(targets)]), dim=-1)
        out.extend(logprobs.gather(-1, targets[:, None])[:, 0].tolist())
    return out
