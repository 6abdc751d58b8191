"""Small runtime choices shared by the engine's parts: device, dtype, attention-span buckets."""
from __future__ import annotations

import warnings

import torch

KV_BUCKET = 128  # CPU attention spans a multiple of this many cache positions, not max_seq_len


def kv_bucket(length: int, max_seq_len: int, bucket: int = KV_BUCKET) -> int:
    return min(max_seq_len, -(-length // bucket) * bucket)


def warn_past_context(max_seq_len: int, **models) -> None:
    """Warn where ``max_seq_len`` lets a sequence run past a model's context (``max_position_embeddings``):
    positions the model was never trained at, whose tokens and log-probs are not the model's behaviour."""
    for role, model in models.items():
        context = model.config.max_position_embeddings
        if max_seq_len > context:
            warnings.warn(f"max_seq_len = {max_seq_len} is past the {role}'s context ({context} positions, "
                          f"max_position_embeddings in its config.json): a sequence longer than that runs at "
                          f"positions the model was never trained at; pass max_seq_len <= {context} "
                          f"(rsd: --max-seq-len) to end sequences there", stacklevel=3)


def resolve_device(device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type not in ("cpu", "cuda"):
        # torch names more device types (mps, meta, xla, xpu, ...); the engine's kernels and caches are CPU and CUDA
        # ones, and the others failed deep inside torch (not linked, no data on meta, an assertion).
        raise ValueError(f"device={device!r} is not supported: rsd runs on CPU or CUDA devices; use 'auto', 'cpu', "
                         f"'cuda' or 'cuda:N'")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but no CUDA device is available: use device='cpu' or "
                         f"'auto'")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}: there is no CUDA device {resolved.index} (this machine has "
                         f"{torch.cuda.device_count()}: 'cuda:0' to 'cuda:{torch.cuda.device_count() - 1}')")
    return resolved


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype={dtype!r} is not supported: use 'auto', 'float32', 'bfloat16' or 'float16'")


def progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="rsd", unit="seq")
