"""Static per-slot KV cache: one preallocated K and V tensor per layer, no bookkeeping.

Each layer holds K and V as [num_slots, max_seq_len + 1, num_kv_heads, head_dim]: a slot's first n
positions are one contiguous block, so gathering slots is a few memcpys. A slot is one
sequence; which positions of it are valid is the caller's knowledge (its length), so rolling back
speculative tokens is just lowering that length: stale entries are overwritten before any query can
attend to them. The extra last position is scratch space: positions >= max_seq_len (only ever padded
entries) are written there and never attended.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, max_seq_len: int, num_kv_heads: int, head_dim: int,
                 *, dtype: torch.dtype, device: torch.device | str):
        if num_slots < 1 or max_seq_len < 1:
            raise ValueError(f"KV cache needs num_slots >= 1 and max_seq_len >= 1, got {num_slots} and {max_seq_len}")
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        shape = (num_slots, max_seq_len + 1, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor | None, positions: torch.Tensor,
               kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, T, kv_heads, head_dim] at (slots[b], positions[b, t]); return the K and V of
        those slots over positions [0, kv_len), each [B, kv_heads, kv_len, head_dim]. slots=None: 0..B-1."""
        k_cache, v_cache = self.k[layer], self.v[layer]
        # Clamping on device (no host check): padded entries past the end land in the scratch position.
        positions = positions.clamp(max=self.max_seq_len)
        rows = torch.arange(k.shape[0], device=k.device) if slots is None else slots
        k_cache.index_put_((rows[:, None], positions), k)
        v_cache.index_put_((rows[:, None], positions), v)
        if slots is None:  # slots 0..B-1: a view, no copy
            k_out, v_out = k_cache[:k.shape[0], :kv_len], v_cache[:k.shape[0], :kv_len]
        else:
            k_out, v_out = k_cache[:, :kv_len].index_select(0, slots), v_cache[:, :kv_len].index_select(0, slots)
        return k_out.transpose(1, 2), v_out.transpose(1, 2)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
