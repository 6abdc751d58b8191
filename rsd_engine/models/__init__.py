"""Llama / Qwen2 / Qwen3 decoders in plain PyTorch over a static per-slot KV cache."""
from .config import SUPPORTED_ARCHITECTURES, ModelConfig
from .hub import ModelUnavailable, resolve_model
from .kv_cache import KVCache
from .loader import load_config, load_model
from .transformer import CausalLM

__all__ = ["CausalLM", "KVCache", "ModelConfig", "ModelUnavailable", "SUPPORTED_ARCHITECTURES", "load_config",
           "load_model", "resolve_model"]
