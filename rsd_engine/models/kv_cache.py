"""Static per-slot KV cache whose memory is committed as it is written, not when it is made.

Each layer holds K and V as [num_slots, max_seq_len + 1, num_kv_heads, head_dim] views: a slot's first n
positions are one contiguous block, so gathering slots is a few memcpys, and slots 0..B-1 are a plain
slice. `update` is the CPU path's write and read; the CUDA forward writes and reads `k` and `v` in place
with its Triton kernels (qk_norm_rope_store, decode_attention), no gather. A slot is one sequence; which positions of it are valid is the caller's knowledge (its length), so
rolling back speculative tokens is just lowering that length: stale entries are overwritten before any
query can attend to them. The extra last position is scratch space: positions >= max_seq_len (only ever
padded entries) are written there and never attended.

Memory. On CPU the views share one anonymous memory map, laid out slot by slot (every layer's K and V of
slot 0, then slot 1, ...), each slot padded to whole pages. The kernel hands out an anonymous page, zeroed,
on its first write and never before (reads of an unwritten page see the shared zero page), so resident
memory follows the positions written, not num_slots x max_seq_len; `release(slot)` gives a finished slot's
pages back (MADV_DONTNEED) and they read as zeros again. This keeps the layout, and so the decode step's
speed and static shapes, which a block-paged cache would trade for a gather per layer per step. Huge pages
are switched off for the map: one write would commit 2 MB. On CUDA memory is reserved up front, as serving
engines do (the device is the engine's), and `release` zeroes the slot.

Zeros matter: masked positions inside the attention span still enter `softmax(...) @ V` with weight 0, and
0 x NaN is NaN, so a slot must never hold NaN left by a request whose logits went non-finite.
"""
from __future__ import annotations

import mmap
import platform
import sys

import torch

# Linux gives pages back with MADV_DONTNEED and refills them with zeros; elsewhere `release` writes zeros.
_CAN_DROP_PAGES = sys.platform.startswith("linux") and hasattr(mmap, "MADV_DONTNEED")
# Reserve address space only: without it Linux refuses a map larger than RAM + swap up front, although
# only the pages written are ever committed. (Python < 3.13 lacks the constant; 0x4000 on x86 and arm.)
_NO_RESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if _CAN_DROP_PAGES and platform.machine() in (
    "x86_64", "aarch64", "arm64") else 0)


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, max_seq_len: int, num_kv_heads: int, head_dim: int,
                 *, dtype: torch.dtype, device: torch.device | str):
        if num_slots < 1 or max_seq_len < 1:
            raise ValueError(f"KV cache needs num_slots >= 1 and max_seq_len >= 1, got {num_slots} and {max_seq_len}")
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.device = torch.device(device)
        self._args = (num_layers, num_slots, max_seq_len, num_kv_heads, head_dim, dtype)
        shape = (num_slots, max_seq_len + 1, num_kv_heads, head_dim)
        nbytes = 2 * num_layers * num_slots * (max_seq_len + 1) * num_kv_heads * head_dim * dtype.itemsize
        if nbytes > sys.maxsize:  # mmap and torch take sizes as int64: past it an OverflowError, not a clear no
            raise MemoryError(f"a KV cache of {num_slots} slots x {max_seq_len} positions would need {nbytes:.3g} "
                              f"bytes: lower max_batch_size or max_seq_len")
        self._map = None
        if self.device.type == "cpu":
            self.k, self.v = self._mapped_views(num_layers, shape, dtype)
        else:
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def _mapped_views(self, num_layers: int, shape: tuple[int, ...], dtype: torch.dtype):
        num_slots, positions, heads, head_dim = shape
        item = torch.empty((), dtype=dtype).element_size()
        block = positions * heads * head_dim  # elements of one layer's K (or V) for one slot
        page = mmap.PAGESIZE
        self._slot_bytes = -(-2 * num_layers * block * item // page) * page
        size = num_slots * self._slot_bytes
        try:
            self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NO_RESERVE)
        except OSError as err:
            raise MemoryError(f"cannot reserve {size / 2**30:.1f} GiB of address space for a KV cache of "
                              f"{num_slots} slots x {positions - 1} positions ({err}): lower max_batch_size or "
                              f"max_seq_len") from None
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            self._map.madvise(mmap.MADV_NOHUGEPAGE)
        flat = torch.frombuffer(self._map, dtype=torch.uint8).view(dtype)
        stride = (self._slot_bytes // item, heads * head_dim, head_dim, 1)
        views = [flat.as_strided(shape, stride, storage_offset=i * block) for i in range(2 * num_layers)]
        return views[0::2], views[1::2]

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

    def release(self, slot: int) -> None:
        """The slot's sequence is done: give its memory back; every position of it reads as zero after."""
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not in [0, {self.num_slots})")
        if self._map is not None and _CAN_DROP_PAGES:
            self._map.madvise(mmap.MADV_DONTNEED, slot * self._slot_bytes, self._slot_bytes)
            return
        for t in self.k + self.v:
            t[slot].zero_()

    def __deepcopy__(self, memo) -> "KVCache":
        *shape, dtype = self._args
        copy = KVCache(*shape, dtype=dtype, device=self.device)
        for mine, theirs in zip(self.k + self.v, copy.k + copy.v):
            theirs.copy_(mine)
        return copy

    def nbytes(self) -> int:
        """Bytes the cache can hold (reserved address space on CPU, of which only written pages are resident)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
