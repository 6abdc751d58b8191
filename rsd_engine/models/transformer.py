"""One decoder for Llama, Qwen2 and Qwen3; the differences are switches in ModelConfig.

Module names mirror HF checkpoints (model.layers.N.self_attn.o_proj, ...), except the merged projections
(MERGED: qkv_proj, gate_up_proj), which the loader concatenates from HF's tensors. The forward has static
shapes and no host syncs, so it compiles with fullgraph=True and is captured as a CUDA graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import rope
from .cpu_gemm import Linear, linear
from .config import ModelConfig
from .kv_cache import KVCache


# Merged projections -> the HF checkpoint tensors they concatenate, in order (loader.py splits names this way).
MERGED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As HF does: normalise in float32, cast back, then scale in the model dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.num_heads, self.num_kv_heads, self.head_dim = layer, c.num_heads, c.num_kv_heads, c.head_dim
        # q, k and v heads in one GEMM; the loader concatenates HF's q_proj, k_proj, v_proj (MERGED).
        self.qkv_proj = Linear(c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, bias=c.qkv_bias)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache, slots, positions, kv_len: int):
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
        k, v = cache.update(self.layer, k, v, slots, positions, kv_len)
        # GQA without repeating K/V: the G query heads sharing a kv head become G*T query rows of it
        # (mask tiled to match), which any SDPA backend takes as plain multi-head attention.
        q = q.transpose(1, 2).reshape(B, Hkv, -1, D)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        # reshape, not view: some backends (CUDA's memory-efficient one) return a [B, L, H, D] layout.
        return self.o_proj(out.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        # gate and up in one GEMM (the loader concatenates HF's gate_proj and up_proj, gate first).
        self.gate_up_proj = Linear(c.hidden_size, 2 * c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c, layer)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, cache, slots, positions, kv_len: int):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, slots, positions, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class CausalLM(nn.Module):
    """A decoder-only LM over a static KV cache.

    forward(input_ids [B, T], positions [B, T], cache, slots [B], kv_len) -> hidden [B, T, hidden_size]:
    writes the new tokens' K/V at cache[slots[b], positions[b, t]], then each query at position p
    attends to cache positions j < kv_len with j <= p. kv_len is a Python int (a length bucket,
    >= every real position + 1): attention cost follows it, not the cache's max_seq_len; each
    distinct value is one compiled graph. Rows may be right-padded: padded entries should carry
    positions >= their row's real length (positions >= max_seq_len go to a scratch position); their
    K/V is garbage that later tokens overwrite before anyone attends to it, and their outputs are
    meaningless. slots=None means slots 0..B-1 (read as a slice, no gather).

    Two paths, same results: on CPU the plain PyTorch one above (SDPA over the span, the reference); on
    CUDA (or with use_triton=True) _forward_triton, where attention reads the cache in place up to each
    query's own position, so kv_len is only validated and one CUDA graph serves every span.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        # Explicit CPU so that building under torch.device("meta") still yields real frequencies.
        with torch.device("cpu"):
            self.register_buffer("inv_freq", rope.inv_freq(config), persistent=False)
        # The Triton forward (_forward_triton): None = on CUDA tensors; True also runs it on CPU (interpreted, tests).
        self.use_triton: bool | None = None
        # The Triton forward's fused skinny-GEMM path runs for B*T <= skinny_rows; None = not chosen yet
        # (skinny.py's row_limit chooses on first use: a probe on CUDA, RSD_SKINNY_GEMM overrides it).
        self.skinny_rows: int | None = None
        self.skinny_probe: dict | None = None  # the probe's µs per forward by row count, for benchmarks
        self._rope_tables = None
        self._retired_rope_tables = []  # replaced by longer ones, kept alive for the graphs that read them

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def new_cache(self, num_slots: int, max_seq_len: int) -> KVCache:
        c = self.config
        if self.device.type == "cuda":
            self.rope_tables(max_seq_len + 1)  # before any graph capture reads them
            self.choose_skinny_rows()  # the probe runs the model: never inside a capture
        return KVCache(c.num_layers, num_slots, max_seq_len, c.num_kv_heads, c.head_dim,
                       dtype=self.dtype, device=self.device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                slots: torch.Tensor | None, kv_len: int) -> torch.Tensor:
        if not 1 <= kv_len <= cache.max_seq_len:
            raise ValueError(f"kv_len must be in [1, max_seq_len={cache.max_seq_len}], got {kv_len}")
        if self.use_triton or (self.use_triton is None and input_ids.is_cuda):
            return self._forward_triton(input_ids, positions, cache, slots)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope.cos_sin(positions, self.inv_freq, x.dtype)
        # [B, 1, T, kv_len]: key j visible to the query at position p iff j <= p. Key 0 is always
        # visible, so no row is fully masked (no NaN) even for padded entries.
        mask = (torch.arange(kv_len, device=positions.device) <= positions[..., None])[:, None]
        mask = mask.repeat(1, 1, self.config.num_heads // self.config.num_kv_heads, 1)  # see Attention
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache, slots, positions, kv_len)
        return self.model.norm(x)

    def _forward_triton(self, input_ids, positions, cache: KVCache, slots) -> torch.Tensor:
        """The forward of CUDA, each kernel reading what it needs where it lies. Attention reads the cache in
        place by slot and position, up to each query's own position, so kv_len plays no part: one captured
        graph serves any span; split attention is one launch too (its last program merges the splits). The
        residual stream ``hidden`` is updated in place.

        Up to ``skinny_rows`` rows (decode steps, verification rounds): 6 kernels per layer, each GEMM a
        skinny_linear with its neighbour fused (the norm before it, SiLU*up before it, the residual add after
        it). More rows: 9 per layer, cuBLAS GEMMs between separate kernels, the MLP's output added by the next
        layer's (or the final) norm."""
        from . import triton_ops as ops

        c = self.config
        B, T = input_ids.shape
        cos, sin = self.rope_tables(cache.max_seq_len + 1)
        if slots is None:
            slots = torch.arange(B, device=input_ids.device)
        positions = positions.contiguous()
        hidden = self.model.embed_tokens(input_ids).view(B * T, -1)
        skinny = B * T <= self.choose_skinny_rows()
        delta = None
        for layer in self.model.layers:
            attn, mlp, i = layer.self_attn, layer.mlp, layer.self_attn.layer
            if skinny:
                qkv = ops.skinny_linear(hidden, attn.qkv_proj.weight, attn.qkv_proj.bias,
                                        norm_weight=layer.input_layernorm.weight, eps=c.rms_norm_eps)
            else:
                x = ops.add_rms_norm(hidden, delta, layer.input_layernorm.weight, c.rms_norm_eps)
                qkv = attn.qkv_proj(x)
            qk_norm = (attn.q_norm.weight, attn.k_norm.weight) if c.qk_norm else (None, None)
            q = ops.qk_norm_rope_store(qkv, positions.view(-1), slots, cos, sin, *qk_norm, cache.k[i], cache.v[i],
                                       num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                                       tokens_per_row=T, eps=c.rms_norm_eps)
            out = ops.decode_attention(q.view(B, T, c.num_heads, c.head_dim), cache.k[i], cache.v[i], slots,
                                       positions).view(B * T, -1)
            if skinny:
                ops.skinny_linear(out, attn.o_proj.weight, attn.o_proj.bias, residual=hidden)
                gate_up = ops.skinny_linear(hidden, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias,
                                            norm_weight=layer.post_attention_layernorm.weight, eps=c.rms_norm_eps)
                ops.skinny_linear(gate_up, mlp.down_proj.weight, mlp.down_proj.bias, silu_mul=True, residual=hidden)
            else:
                x = ops.add_rms_norm(hidden, attn.o_proj(out), layer.post_attention_layernorm.weight, c.rms_norm_eps)
                delta = mlp.down_proj(ops.silu_mul(mlp.gate_up_proj(x)))
        return ops.add_rms_norm(hidden, delta, self.model.norm.weight, c.rms_norm_eps).view(B, T, -1)

    def choose_skinny_rows(self) -> int:
        """skinny_rows, chosen once (see skinny.py): the most rows the fused skinny-GEMM path takes."""
        if self.skinny_rows is None:
            from .skinny import row_limit

            self.skinny_rows = row_limit(self)
        return self.skinny_rows

    def rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [>= length, head_dim / 2] float32 on the model's device, built once (grown if a longer
        cache comes); the Triton forward indexes them by position instead of computing RoPE each step.
        Tables a longer cache replaces are kept, never freed: CUDA graphs captured with them read them by
        address at every replay (an engine's graphs, while `rsd generate --select provenance` builds a
        longer cache of the same models to score with)."""
        tables = self._rope_tables
        if tables is None or tables[0].shape[0] < length or tables[0].device != self.device:
            if tables is not None:
                self._retired_rope_tables.append(tables)
            self._rope_tables = tables = rope.tables(self.inv_freq, length, self.device)
        return tables

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., hidden_size] -> float32 logits [..., vocab_size] (every embedding row)."""
        return linear(hidden, self.head_weight).float()

    def sampler_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for the samplers, which read float32, bf16 and fp16 as they are: the model dtype on CUDA
        (a float32 copy of [B, V] is one more kernel and twice the bytes), float32 on CPU as ``logits``."""
        if hidden.is_cuda:
            return F.linear(hidden, self.head_weight)
        return self.logits(hidden)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
