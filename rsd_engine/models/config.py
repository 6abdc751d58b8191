"""ModelConfig: the few fields of an HF config.json that the decoder needs, for Llama / Qwen2 / Qwen3."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
SUPPORTED_ROPE_TYPES = ("default", "llama3")
SUPPORTED_ACTIVATIONS = ("silu", "swish")  # the MLP's SiLU(gate) * up; transformers' ACT2FN names SiLU both ways
REQUIRED_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
MAX_SIZE = 2**31 - 1  # of each size field: far above any real model's (theirs are below 10**8)
MAX_WEIGHT_ELEMENTS = 2**61  # of one weight: its float32 bytes must fit in the int64 torch counts storage in


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 always; Llama and Qwen3 when attention_bias
    o_bias: bool = False  # Llama's and Qwen3's attention_bias also puts a bias on o_proj (never Qwen2's)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before RoPE
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # rope_type + its params; {} for plain RoPE
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, config: dict, generation_config: dict | None = None) -> "ModelConfig":
        """Build from the dicts of config.json (and generation_config.json, for extra EOS ids)."""
        try:
            return cls._from_hf(config, generation_config)
        except KeyError as err:
            raise ValueError(f"config.json has no {err.args[0]!r}, which a {config.get('architectures')} model "
                             f"needs") from None
        except (TypeError, AttributeError) as err:
            raise ValueError(f"config.json has a setting of the wrong type ({err})") from None

    @classmethod
    def _from_hf(cls, config: dict, generation_config: dict | None = None) -> "ModelConfig":
        architecture = _architecture(config)
        quantization = config.get("quantization_config")
        if quantization:
            method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else quantization
            raise ValueError(f"a quantized checkpoint (quantization_config: {method}) is not supported: its weights "
                             f"need their scales, which rsd-engine does not apply; give the model's float16, "
                             f"bfloat16 or float32 weights")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = config[name] if name in REQUIRED_SIZES else config.get(name)
            if (value is not None or name in REQUIRED_SIZES) and not (
                    isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_SIZE):
                raise ValueError(f"config.json: {name} = {value!r}, where a positive integer is needed "
                                 f"(at most 2**31 - 1 = {MAX_SIZE})")
        for name in ("rms_norm_eps", "rope_theta"):
            value = config.get(name)
            if value is not None and not _number(value) > 0:
                raise ValueError(f"config.json: {name} = {value!r}, where a finite positive number is needed")
        # Read as given, not by truth value: bool("no") is True (a tie that dropped the checkpoint's lm_head).
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            value = config.get(name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"config.json: {name} = {value!r}, where true or false is needed")
        for name in ("pad_token_id", "bos_token_id"):  # not read here, but transformers refuses them at the tokenizer
            value = config.get(name)
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool)):
                raise ValueError(f"config.json: {name} = {value!r}, where an integer token id (or null) is needed")
        num_heads = config["num_attention_heads"]
        hidden_size = config["hidden_size"]
        is_llama = architecture == "LlamaForCausalLM"
        # transformers' Llama and Qwen3 put a bias on q, k, v and o_proj when attention_bias; Qwen2 on q, k, v always.
        attention_bias = architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM") and bool(config.get("attention_bias"))
        activation = config.get("hidden_act", "silu")
        if activation not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"hidden_act {activation!r} is not supported; the MLP is SwiGLU, so hidden_act must be "
                             f"one of {', '.join(SUPPORTED_ACTIVATIONS)}")
        if config.get("use_sliding_window"):
            raise ValueError(f"{architecture} with use_sliding_window=true is not supported; "
                             "only full attention in every layer is")
        rope_theta, rope_scaling = _rope(config)
        eos = _ids(config.get("eos_token_id"), "config.json")
        if generation_config:
            eos += [i for i in _ids(generation_config.get("eos_token_id"), "generation_config.json") if i not in eos]
        model_config = cls(
            architecture=architecture,
            vocab_size=config["vocab_size"],
            hidden_size=hidden_size,
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or hidden_size // num_heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            max_position_embeddings=config.get("max_position_embeddings") or 4096,  # (null: as absent)
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=architecture == "Qwen2ForCausalLM" or attention_bias,
            o_bias=attention_bias,
            mlp_bias=is_llama and bool(config.get("mlp_bias")),
            qk_norm=architecture == "Qwen3ForCausalLM",
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            eos_token_ids=tuple(eos),
        )
        _check_weight_sizes(model_config)
        return model_config


def _architecture(config: dict) -> str:
    archs = config.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    archs = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            # transformers reads the config (and picks the tokenizer) by model_type, this loader by architecture:
            # another model's type was a transformers config dump, then an error that blamed the tokenizer.
            model_type = config.get("model_type", MODEL_TYPES[arch])
            if model_type != MODEL_TYPES[arch]:
                supported = ", ".join(f"{a} (model_type {t!r})" for a, t in MODEL_TYPES.items())
                raise ValueError(f"config.json: model_type = {model_type!r} with architectures = {archs}: "
                                 f"{arch} is model_type {MODEL_TYPES[arch]!r}, so the two name different models. "
                                 f"Supported: {supported}")
            if config.get("auto_map"):
                warnings.warn(f"config.json has auto_map (custom modelling code, never run here): the model is loaded "
                              f"as the built-in {arch}; if its own code computes something else, so will this",
                              stacklevel=3)
            return arch
    named = ", ".join(archs) if archs else f"none (model_type={config.get('model_type')!r})"
    hint = ""
    if config.get("auto_map"):
        hint = (" The config has auto_map (custom modelling code); remote code is never run, "
                "so such models cannot be loaded.")
    raise ValueError(f"unsupported architecture: {named}. Supported: {', '.join(SUPPORTED_ARCHITECTURES)}.{hint}")


def _check_weight_sizes(c: ModelConfig) -> None:
    """Sizes that each pass can still multiply into a weight torch cannot size (a RuntimeError from deep inside
    torch when the model is built): each weight's element count is refused past MAX_WEIGHT_ELEMENTS, naming the
    fields it is made of. The merged projections are the largest (o_proj's and down_proj's are no larger)."""
    for fields, rows, cols in (
            ("vocab_size x hidden_size (embed_tokens, lm_head)", c.vocab_size, c.hidden_size),
            ("(num_attention_heads + 2 * num_key_value_heads) * head_dim x hidden_size (q, k and v_proj)",
             (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, c.hidden_size),
            ("2 * intermediate_size x hidden_size (gate and up_proj)", 2 * c.intermediate_size, c.hidden_size)):
        if rows * cols > MAX_WEIGHT_ELEMENTS:
            raise ValueError(f"config.json: {fields} = {rows} x {cols} = {rows * cols} elements in one weight, "
                             f"where at most 2**61 are possible (its float32 bytes must fit in a 64-bit size)")


def _rope(config: dict) -> tuple[float, dict]:
    """(theta, scaling) from transformers-5 `rope_parameters` or the older `rope_theta` + `rope_scaling`. Each
    setting is checked here, naming its field and range (transformers only warns of a llama3 factor < 1; a factor
    of 0 gave NaN logits at every step, a low_freq_factor of 0 a ZeroDivisionError)."""
    for name in ("rope_parameters", "rope_scaling"):
        if config.get(name) is not None and not isinstance(config[name], dict):  # ([], "", 0 or false too)
            raise ValueError(f"config.json: {name} = {config[name]!r}, where an object (or null) is needed")
    base, scaling = dict(config.get("rope_parameters") or {}), dict(config.get("rope_scaling") or {})
    # Each names its type as rope_type or (older configs) type; transformers reads rope_scaling's over a
    # rope_parameters left at "default".
    base_type, scaled_type = _rope_type(base), _rope_type(scaling)
    if base_type not in (None, "default") and scaled_type not in (None, base_type):
        raise ValueError(f"config.json names two RoPE types, {base_type!r} in rope_parameters and {scaled_type!r} in "
                         f"rope_scaling; keep one")
    params = {**base, **scaling}

    def field(key: str) -> str:  # the name of the field `key` of params was read from
        return f"{'rope_scaling' if key in scaling else 'rope_parameters'}.{key}"

    theta = params.pop("rope_theta", config.get("rope_theta", 10000.0))
    if not _number(theta) > 0:
        name = field("rope_theta") if "rope_theta" in base or "rope_theta" in scaling else "rope_theta"
        raise ValueError(f"config.json: {name} = {theta!r}, where a finite positive number is needed")
    theta = float(theta)
    rope_type = scaled_type or base_type or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported RoPE type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if params.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported; RoPE must rotate the whole head")
    if rope_type == "default":
        return theta, {}
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in params]
    if missing:
        raise ValueError(f"llama3 RoPE scaling is missing {', '.join(missing)} in config.json")
    for key, least, valid in (("factor", 1, "a number >= 1"), ("low_freq_factor", 0, "a number > 0"),
                              ("high_freq_factor", 0, "a number > 0")):
        value = _number(params[key])
        if not (value >= least if key == "factor" else value > least):
            raise ValueError(f"config.json: {field(key)} = {params[key]!r}, where {valid} is needed")
        params[key] = value
    if not params["high_freq_factor"] > params["low_freq_factor"]:
        where = "rope_scaling" if "high_freq_factor" in scaling else "rope_parameters"
        raise ValueError(f"config.json: llama3 RoPE needs high_freq_factor > low_freq_factor in {where}, got "
                         f"{params['high_freq_factor']!r} and {params['low_freq_factor']!r}")
    old_len = params.setdefault("original_max_position_embeddings", config.get("max_position_embeddings") or 4096)
    if not (isinstance(old_len, int) and not isinstance(old_len, bool) and old_len > 0):
        raise ValueError(f"config.json: {field('original_max_position_embeddings')} = {old_len!r}, where a positive "
                         f"integer is needed")
    return theta, {"rope_type": rope_type, **params}


def _rope_type(params: dict) -> str | None:
    """The RoPE type a rope_parameters / rope_scaling dict names (its keys for it removed)."""
    named = params.pop("rope_type", None)
    legacy = params.pop("type", None)
    return named if named is not None else legacy


def _number(value) -> float:
    """`value` as a float where it is a finite number (not a bool, a string or JSON's Infinity); NaN otherwise,
    which every comparison refuses."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    try:
        value = float(value)
    except OverflowError:  # an int past float's range
        return math.nan
    return value if math.isfinite(value) else math.nan


def _ids(value, where: str) -> list[int]:
    """The EOS ids of `where`'s eos_token_id: one id, a list of them, or null."""
    if value is None:
        return []
    ids = list(value) if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{where}: eos_token_id = {value!r}, where a token id (an integer >= 0) or a list of them "
                         f"(or null) is needed")
    return ids
