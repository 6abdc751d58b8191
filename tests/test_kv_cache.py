"""KV-cache memory follows what is written, not num_slots x max_seq_len; released slots read as zeros.

Resident bytes of the cache are read from /proc/self/pagemap over the cache's own address range, so the
figures are the kernel's, free of allocator noise elsewhere in the process."""
import copy
import sys

import numpy as np
import pytest
import torch

from rsd_engine import Engine, SamplingParams
from rsd_engine.models.kv_cache import KVCache

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/pagemap")
PAGE = 4096


def resident_bytes(cache: KVCache) -> int:
    """Bytes of ``cache``'s memory map backed by pages of its own: /proc/self/pagemap entries that are
    present (bit 63) and mapped by this process alone (bit 56), which leaves out the shared zero page
    that reads of never-written memory map."""
    start, size = cache.k[0].data_ptr(), len(cache._map)
    assert start % PAGE == 0
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(start // PAGE * 8)
        entries = np.frombuffer(f.read(size // PAGE * 8), dtype=np.uint64)
    own = np.uint64((1 << 63) | (1 << 56))
    return int(np.count_nonzero(entries & own == own)) * PAGE


def bytes_per_position(cache: KVCache) -> int:
    return sum(t[0, 0].numel() * t.element_size() for t in cache.k + cache.v)


def write(cache, slot, start, n):
    for layer in range(len(cache.k)):
        kv = torch.randn(1, n, *cache.k[layer].shape[2:]).to(cache.k[layer].dtype)
        cache.update(layer, kv, kv.clone(), torch.tensor([slot]), torch.arange(start, start + n)[None], 1)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_cache_past_what_int64_sizes_is_out_of_memory(device):
    """2**31 slots x 2**31 positions: mmap raised an OverflowError (its size is a C ssize_t); now the MemoryError
    that a cache too large to reserve gives ("meta" stands for CUDA: torch's sizes are int64 there too)."""
    with pytest.raises(MemoryError, match=r"a KV cache of 2147483648 slots x 2147483647 positions would need"):
        KVCache(2, 2**31, 2**31 - 1, 2, 64, dtype=torch.float32, device=device)


@linux_only
def test_memory_follows_positions_written_and_release_gives_it_back():
    cache = KVCache(4, 8, 4096, 2, 64, dtype=torch.float32, device="cpu")
    assert cache.nbytes() > 64 * 2**20 and resident_bytes(cache) == 0
    write(cache, 3, 0, 100)
    written = 100 * bytes_per_position(cache)
    # Each layer's K and V of a slot start their own run of pages: at most two partly used pages each.
    assert written <= resident_bytes(cache) <= written + 2 * 8 * PAGE
    write(cache, 5, 1000, 10)  # a far position of another slot commits only its own pages
    assert resident_bytes(cache) <= written + 10 * bytes_per_position(cache) + 4 * 8 * PAGE
    cache.release(3)
    cache.release(5)
    assert resident_bytes(cache) == 0
    assert all(not t.any() for t in cache.k + cache.v)  # released slots read as zeros


def test_release_clears_nan_and_keeps_other_slots():
    cache = KVCache(2, 3, 64, 2, 8, dtype=torch.float32, device="cpu")
    write(cache, 0, 0, 5)
    write(cache, 2, 0, 5)  # the slot after the released one keeps its pages too
    kept = [t[[0, 2]].clone() for t in cache.k + cache.v]
    for t in cache.k + cache.v:
        t[1, :7] = float("nan")
    cache.release(1)
    assert all(not t[1].any() for t in cache.k + cache.v)
    assert all(torch.equal(t[[0, 2]], want) for t, want in zip(cache.k + cache.v, kept))
    with pytest.raises(ValueError, match=r"slot 3 is not in \[0, 3\)"):
        cache.release(3)


def test_deepcopy_is_independent():
    cache = KVCache(2, 2, 16, 1, 4, dtype=torch.bfloat16, device="cpu")
    write(cache, 1, 0, 4)
    twin = copy.deepcopy(cache)
    assert all(torch.equal(a, b) for a, b in zip(cache.k + cache.v, twin.k + twin.v))
    cache.release(1)
    assert twin.k[0][1, :4].any() and not cache.k[0][1].any()


@linux_only
def test_default_engine_memory_is_bounded_by_tokens_in_flight(tiny_pair, monkeypatch):
    """The README's Engine(...) call (32 slots of 4096 positions) commits cache memory only for the
    positions its requests reach, and gives it back when they finish."""
    engine = Engine(*tiny_pair, device="cpu", sampler="reference")
    caches = (engine.teacher_cache, engine.student_cache)
    assert engine.max_batch_size == 32 and engine.max_seq_len == 4096
    assert sum(c.nbytes() for c in caches) > 200 * 2**20
    assert sum(resident_bytes(c) for c in caches) == 0

    peaks, real_decode = [], engine._decode

    def watched(batch):
        finished = real_decode(batch)
        in_flight = [(r.teacher_len + 1, r.student_len + 1) for r in batch]
        resident = [resident_bytes(c) for c in caches]
        # Writes reach at most one prefill chunk (its padding) past a row's length: bound by the longest.
        for i, cache in enumerate(caches):
            longest = max(lens[i] for lens in in_flight)
            bound = len(batch) * (longest * bytes_per_position(cache) + 4 * len(cache.k) * PAGE)
            assert resident[i] <= bound, (i, resident[i], bound)
        peaks.append(sum(resident))
        return finished

    monkeypatch.setattr(engine, "_decode", watched)
    prompts = ["The answer is", "Let x be a number", "1 + 1 =", "We compute 12 * 12"]
    results = engine.generate_batch(prompts, SamplingParams(max_new_tokens=40, seed=1, ignore_eos=True))
    assert all(len(r.token_ids) == 40 for r in results)
    assert 0 < max(peaks) < 2 * 2**20
    assert sum(resident_bytes(c) for c in caches) == 0  # every slot given back
