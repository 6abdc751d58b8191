"""Load a CausalLM from an HF folder: config.json + safetensors (single file or sharded with an index).
The folder may be named by a Hugging Face Hub id (hub.py fetches it into the Hub cache).

Only safetensors are read: pickle checkpoints can run arbitrary code when unpickled, and so can the
custom modelling code that `auto_map` points to. Pickle weights are refused; that code is never run: a config
whose architecture is not built in is refused, one that is loads with the built-in code, with a warning.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import cpu_gemm
from .config import ModelConfig
from .hub import index_shards, read_json_object, resolve_model
from .transformer import MERGED, CausalLM
from ..runtime import resolve_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def load_model(folder, *, dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu",
               revision: str | None = None) -> CausalLM:
    """Load the model in `folder` (or Hub id, at `revision`) in `dtype` (float32, bfloat16 or float16) onto
    `device`, ready for inference. A CUDA device becomes the process's current device: Triton launches its
    kernels on the current device and stream, and CUDA graphs capture the current stream, whatever device the
    tensors are on (with cuda:1 and the current device 0, the kernels ran on GPU 0 with GPU 1's pointers, and a
    capture missed every torch op of the step). The models of one process share a device."""
    dtype = _dtype(dtype)
    device = resolve_device(device)  # a device rsd does not run on (mps, meta, a CUDA index past the cards) named here
    if device.type == "cpu":
        cpu_gemm.uses_onednn()  # an RSD_CPU_GEMM that names no choice is refused here, not at the first token
    if device.type == "cuda":
        if os.environ.get("RSD_PDL", "").strip():  # one that names no choice is refused here, not at the first launch
            from ..sampling.triton import pdl_requested

            pdl_requested()
        if device.index is not None:
            torch.cuda.set_device(device)
    folder = resolve_model(folder, revision)
    config = load_config(folder)
    files = _weight_files(folder)
    _check_layers(config, files)
    model = _build(config)
    _load_weights(model, files, dtype, device)
    return model.to(device).eval().requires_grad_(False)


def check_model_folder(folder, revision: str | None = None) -> Path:
    """The model's folder: ``folder`` itself, or the Hub snapshot it names; else an error that says what was
    given instead (see hub.py)."""
    return resolve_model(folder, revision)


def read_safetensors(path: Path, names=None, *, model=None, skipped: list | None = None):
    """Yield (name, tensor) for the tensors of one safetensors file (only ``names`` if given; the others'
    names are appended to ``skipped`` if given), on CPU as stored, one at a time. A file that is not valid
    safetensors (truncated, corrupt) is a ValueError that names the file, its model and how to get a good copy."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                if names is None or name in names:
                    yield name, f.get_tensor(name)
                elif skipped is not None:
                    skipped.append(name)
    except (SafetensorError, OSError) as err:
        raise _unreadable(path, model, err) from None


def tensor_names(path: Path, *, model=None) -> list[str]:
    """The names of the tensors of one safetensors file, from its header alone (no tensor is read); a file that is
    not valid safetensors is the ValueError read_safetensors raises."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as err:
        raise _unreadable(path, model, err) from None


def _unreadable(path: Path, model, err) -> ValueError:
    return ValueError(f"{path} (model {model or path.parent}) is not a readable safetensors file, maybe "
                      f"truncated or corrupt ({err}). {_rebuild_hint(path.parent)}")


def _rebuild_hint(folder: Path) -> str:
    from ..pipeline.demo_models import cache_dir  # the demo pair is built into the cache by demo_models.py

    if folder.resolve().parent == cache_dir().resolve():
        return (f"It is the demo pair's cache: delete {folder} and run `rsd demo` again, which rebuilds it "
                f"(rsd_engine/pipeline/demo_models.py).")
    return "Download or convert the weights again."


def load_config(folder) -> ModelConfig:
    folder = resolve_model(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; a model folder needs config.json and *.safetensors")
    generation_path = folder / "generation_config.json"
    generation = read_json_object(generation_path) if generation_path.is_file() else None
    config = read_json_object(path)
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            return ModelConfig.from_hf(config, generation)
    except ValueError as err:  # named by the folder's file: of a teacher and a student, which one
        message = str(err)
        for name in ("generation_config.json", "config.json"):
            if message.startswith(name):
                raise ValueError(f"{folder / name}{message[len(name):]}") from None
        raise ValueError(f"{path}: {message}") from None
    finally:
        for warning in caught:  # said before an error too, each named by the folder's file as the errors are
            message = str(warning.message)
            if message.startswith("config.json"):
                message = f"{path}{message[len('config.json'):]}"
            warnings.warn(message, warning.category, stacklevel=2)


FLOAT_WEIGHTS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The decoder's parameters in HF's names; a checkpoint tensor named so that the model lacks is refused.
DECODER_PARAM = re.compile(r"model\..*\.(weight|bias)")
LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.")  # a tensor of layer N, in HF's names


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype in DTYPES.values():
        return dtype
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or the torch dtype), got {dtype!r}")


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = index_shards(index)
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are not in the folder: {', '.join(missing[:5])}")
        return [folder / n for n in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern))
    if pickles:
        raise FileNotFoundError(
            f"{folder} has only pickle weights ({', '.join(pickles[:3])}); pickle files are refused because "
            "loading them can run arbitrary code. Convert them to safetensors (model.safetensors) first.")
    raise FileNotFoundError(f"{folder} has no safetensors weights (model.safetensors or a sharded "
                            "model.safetensors.index.json)")


def _check_layers(config: ModelConfig, files: list[Path]) -> None:
    """num_hidden_layers past the layers the checkpoint holds fails at the missing tensors, but only once that many
    layers are built: 10**6 (a size field's cap is 2**31 - 1) built for minutes, to gigabytes, first. The headers
    name the layers held; a config naming fewer is refused later, naming the tensors it does not account for."""
    names = [name for path in files for name in tensor_names(path, model=path.parent)]
    held = {int(m[1]) for name in names if (m := LAYER_TENSOR.match(name))}
    if config.num_layers > len(held):
        found = (f"the tensors of {len(held)} layers" if held else
                 f"no layer's tensors (model.layers.N.*; it holds {', '.join(names[:3]) or 'no tensor'})")
        raise ValueError(f"{files[0].parent / 'config.json'}: num_hidden_layers = {config.num_layers}, where at most "
                         f"{len(held)} can load: the checkpoint holds {found} (is config.json this checkpoint's?)")


def _build(config: ModelConfig) -> CausalLM:
    with torch.device("meta"):  # no memory or init cost; load_state_dict(assign=True) fills the params
        return CausalLM(config)


def _load_weights(model: CausalLM, files: list[Path], dtype: torch.dtype, device) -> None:
    expected, merged = _checkpoint_layout(model)
    state, skipped, found_in = {}, [], {}
    for path in files:
        # Names not expected are skipped: e.g. lm_head.weight saved next to tied embeddings, or rotary buffers.
        for name, tensor in read_safetensors(path, expected, model=path.parent, skipped=skipped):
            if name in found_in:  # which copy is the model's? The index names one file; a glob names none
                raise ValueError(f"{path.parent}: tensor {name} is stored twice, in {found_in[name].name} and {path.name}; a "
                                 f"checkpoint holds each tensor once (remove the stray file, or fix "
                                 f"model.safetensors.index.json)")
            found_in[name] = path
            if tensor.shape != expected[name]:
                raise ValueError(f"{path.parent}: tensor {name} in {path.name} has shape {tuple(tensor.shape)}, "
                                 f"config.json implies {tuple(expected[name])}")
            if tensor.dtype not in FLOAT_WEIGHTS:
                raise ValueError(f"{path.parent}: tensor {name} in {path.name} is stored as {tensor.dtype}: quantized or integer "
                                 f"weights are not supported (their scales would be dropped); give the model's "
                                 f"float16, bfloat16 or float32 weights")
            state[name] = tensor.to(device=device, dtype=dtype)
    missing = [name for name in expected if name not in state]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{files[0].parent}: the checkpoint is missing {len(missing)} tensors: "
                         f"{', '.join(missing[:5])}{more}")
    # But a decoder weight or bias the config does not account for (a bias without attention_bias, a layer past
    # num_hidden_layers) would change the model's outputs if dropped: refused, not skipped.
    unused = sorted(name for name in skipped if DECODER_PARAM.fullmatch(name))
    if unused:
        more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
        raise ValueError(f"{files[0].parent}: the checkpoint has {len(unused)} tensor(s) that config.json does not "
                         f"account for: "
                         f"{', '.join(unused[:5])}{more}; they are not dropped silently, as that would change the "
                         f"model (check attention_bias, mlp_bias, num_hidden_layers, architectures)")
    for name, parts in merged.items():
        state[name] = torch.cat([state.pop(part) for part in parts])
    model.load_state_dict(state, assign=True)


def _checkpoint_layout(model: CausalLM) -> tuple[dict[str, torch.Size], dict[str, list[str]]]:
    """The HF checkpoint's tensor names and shapes for ``model``, and each merged parameter's HF parts
    (e.g. ...self_attn.qkv_proj.weight <- q_proj, k_proj, v_proj weights), split by output rows."""
    c = model.config
    rows = {"self_attn.q_proj": c.num_heads * c.head_dim, "self_attn.k_proj": c.num_kv_heads * c.head_dim,
            "self_attn.v_proj": c.num_kv_heads * c.head_dim, "mlp.gate_proj": c.intermediate_size,
            "mlp.up_proj": c.intermediate_size}
    pattern = re.compile(rf"(.*\.)({'|'.join(map(re.escape, MERGED))})\.(weight|bias)")
    expected, merged = {}, {}
    for name, p in model.state_dict().items():
        match = pattern.fullmatch(name)
        if match is None:
            expected[name] = p.shape
            continue
        prefix, fused, param = match.groups()
        merged[name] = [f"{prefix}{part}.{param}" for part in MERGED[fused]]
        for part, hf_name in zip(MERGED[fused], merged[name]):
            expected[hf_name] = torch.Size((rows[part], *p.shape[1:]))
    return expected, merged
