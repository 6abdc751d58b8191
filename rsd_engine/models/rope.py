"""Rotary position embeddings: plain and Llama-3.1 scaled frequencies, applied in the rotate-half layout."""
from __future__ import annotations

import math

import torch

from .config import ModelConfig


def inv_freq(config: ModelConfig) -> torch.Tensor:
    """[head_dim / 2] float32 inverse frequencies."""
    dim = config.head_dim
    freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if config.rope_scaling.get("rope_type") == "llama3":
        freq = _llama3(freq, config.rope_scaling)
    return freq


def _llama3(freq: torch.Tensor, s: dict) -> torch.Tensor:
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between blended smoothly.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > old_len / low, freq / factor, freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, blended, scaled)


def cos_sin(positions: torch.Tensor, freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] -> cos, sin [B, T, 1, head_dim] (broadcast over heads), computed in float32."""
    angles = positions.float()[..., None] * freq
    angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def tables(freq: torch.Tensor, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, head_dim / 2] float32 of positions 0..length-1 (the CUDA path indexes them)."""
    angles = torch.arange(length, dtype=torch.float32, device=device)[:, None] * freq.to(device)
    return angles.cos().contiguous(), angles.sin().contiguous()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
