"""Single-model sampling in plain PyTorch: the contract of ``sample_tokens`` on every backend.

Used for the student's drafts in speculative rounds (DESIGN.md §8) and for one-model generation.

Inputs, for a batch of B rows:
    logits       [B, V'] any float dtype
    uniforms     [B] float32 in (0, 1], one per row
    temperature  [B] float32 (0 = argmax, lowest id on ties)
    top_k        [B] int32 (0 = off)
    top_p        [B] float32 in (0, 1]
    mask         [V] bool, V <= V': ids that may be drawn

Law: truncate(softmax(logits / temperature) on mask, top_k, top_p), the same truncation as the student
fallback of ``rsd_sample`` (see reference.py), drawn by inverse CDF in id order with the row's uniform.

Output: token [B] int64. A row whose logits hold NaN or +inf (anywhere, padding included), or whose
mask leaves no id with a finite logit, gets ``SAMPLE_FLAGGED`` (-1) instead of a token.
"""
from __future__ import annotations

import torch

from .reference import inverse_cdf, truncated_probs

SAMPLE_FLAGGED = -1


def nonfinite_rows(logits: torch.Tensor) -> torch.Tensor:
    """[B] bool: rows holding NaN or +inf (-inf is a legal logit: an id the model rules out)."""
    return (torch.isnan(logits) | (logits == float("inf"))).any(dim=-1)


def sample_tokens_reference(logits, uniforms, temperature, top_k, top_p, mask) -> torch.Tensor:
    logits = logits.float()
    weights = truncated_probs(logits, temperature, top_k, top_p, mask)
    token = inverse_cdf(torch.nan_to_num(weights, nan=0.0), uniforms.float())
    empty = ~(torch.isfinite(logits[:, : mask.numel()]) & mask).any(dim=-1)
    return torch.where(nonfinite_rows(logits) | empty, SAMPLE_FLAGGED, token)
