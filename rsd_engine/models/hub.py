"""Model names: a local folder, or a Hugging Face Hub id (``Qwen/Qwen3-0.6B``) fetched into the Hub cache.

``resolve_model`` is the one place a name becomes a folder; every command, Engine, Generator and the
loaders go through it. A path that exists always wins over a Hub id of the same spelling. Hub ids go
through ``huggingface_hub.snapshot_download``, so HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and the
token are honoured as by every HF tool, and a cached snapshot is used without the network.

Only what the loaders read is fetched: config, generation config, tokenizer files and safetensors
weights. Pickle checkpoints (*.bin, *.pt, ...) and modelling code (*.py) are never downloaded; a repo
with no safetensors is refused. Weights come in a second pass that names the files the index lists
(or model.safetensors), so a repo that also ships a consolidated copy of the weights (Mistral's
consolidated.safetensors) is not downloaded twice.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as on the Hugging Face Hub
METADATA_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                  "chat_template.jinja", "chat_template.json", "model.safetensors.index.json"]
SAFETENSORS_INDEX = "model.safetensors.index.json"


class ModelUnavailable(FileNotFoundError):
    """A model name that is neither a local folder nor a Hub model that can be had (cached or fetched)."""


def is_hub_id(name) -> bool:
    return isinstance(name, str) and HUB_ID.fullmatch(name) is not None and not Path(name).exists()


def resolve_model(name_or_path, revision: str | None = None) -> Path:
    """The local folder of a model: ``name_or_path`` itself if it exists, else the Hub snapshot of that id
    at ``revision`` (a branch, tag or commit; default main). ``revision`` applies to Hub ids only."""
    path = Path(name_or_path)
    if path.exists():
        if revision is not None:
            raise ValueError(f"revision {revision!r} was given for {name_or_path}, a local folder: a revision "
                             f"applies to Hugging Face Hub ids only")
        if path.is_file():
            raise NotADirectoryError(f"{path} is a file, but a model is a folder (config.json, *.safetensors and "
                                     f"the tokenizer files): pass the folder that holds it, e.g. {path.parent}")
        return path
    if not is_hub_id(str(name_or_path)):
        raise ModelUnavailable(f"model folder not found: {name_or_path} (a Hugging Face Hub id is owner/name, "
                               f"e.g. Qwen/Qwen3-0.6B)")
    return _snapshot(str(name_or_path), revision)


def _snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    where = f"{repo_id} (revision {revision})" if revision else repo_id

    def download(at: str | None, patterns: list[str]) -> Path:
        try:
            return Path(snapshot_download(repo_id, revision=at, allow_patterns=patterns))
        except Exception as err:  # huggingface_hub's errors say what went wrong; the message says what to do
            raise ModelUnavailable(_explain(where, repo_id, revision, err)) from None

    folder = download(revision, METADATA_FILES)
    weights = _weight_names(folder)  # a malformed index is a ValueError that names it, not a download error
    # The snapshot folder is named by its commit: the weights come from the same commit.
    folder = download(folder.name, weights)
    missing = [name for name in weights if not (folder / name).is_file()]
    if missing == ["model.safetensors"]:
        raise ModelUnavailable(
            f"model {where}: the Hub snapshot in {folder} has no safetensors weights (model.safetensors or a "
            f"sharded {SAFETENSORS_INDEX}). Either the repo has none: pickle checkpoints (*.bin, *.pt) are never "
            f"downloaded or loaded, because loading them can run arbitrary code, so use a repo that publishes "
            f"safetensors, or convert the weights and pass the local folder; or they are not cached yet and the "
            f"Hub could not be asked (HF_HUB_OFFLINE, no network): fetch them once with `hf download {repo_id}`")
    if missing:
        raise ModelUnavailable(f"model {where}: the Hub snapshot in {folder} lacks {', '.join(missing[:3])}, which "
                               f"its {SAFETENSORS_INDEX} lists; fetch it again with network access")
    return folder


def _weight_names(folder: Path) -> list[str]:
    """The safetensors files the snapshot's index names, else model.safetensors."""
    index = folder / SAFETENSORS_INDEX
    return index_shards(index) if index.is_file() else ["model.safetensors"]


def read_json_object(path: Path) -> dict:
    """A model folder's JSON file (config, generation config, index): a ValueError that names the file when it
    is not JSON or not an object."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def index_shards(index: Path) -> list[str]:
    """The shard file names a model.safetensors.index.json lists, sorted, each once. An index that is not
    JSON, not an object, or whose weight_map is not a non-empty map of tensor names to file names is a
    ValueError that names it; so is a file named outside the index's folder (``../x.safetensors``, an absolute
    path), which would load another folder's weights."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) and name for name in weight_map.values()):
        raise ValueError(f"{index}: weight_map must map tensor names to file names")
    if not weight_map:
        raise ValueError(f"{index} has an empty weight_map")
    for tensor, name in weight_map.items():  # read by name, not resolved: a Hub snapshot's shards link out to blobs
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"{index}: weight_map names {name!r} for {tensor}, a file outside the model folder; "
                             f"a shard is named relative to the folder, inside it (e.g. "
                             f"model-00001-of-00002.safetensors)")
    return sorted(set(weight_map.values()))


def _explain(where: str, repo_id: str, revision: str | None, err: Exception) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    head = f"model {where} is not a local folder and could not be had from the Hugging Face Hub"
    get = f"`hf download {repo_id}{f' --revision {revision}' if revision else ''}`"
    if isinstance(err, GatedRepoError):
        return f"{head}: the repo is gated; accept its terms on huggingface.co and log in (`hf auth login`)"
    if isinstance(err, RevisionNotFoundError):
        return f"{head}: the repo has no revision {revision!r}; give a branch, tag or commit it has"
    if isinstance(err, RepositoryNotFoundError):
        return (f"{head}: no such repo (or it is private: log in with `hf auth login`); check the id, or pass a "
                f"local model folder")
    if isinstance(err, HFValidationError):
        return f"{head}: {err}"
    if isinstance(err, LocalEntryNotFoundError):
        cache = constants.HF_HUB_CACHE
        if constants.HF_HUB_OFFLINE:
            return (f"{head}: it is not in the Hub cache ({cache}) at this revision, and HF_HUB_OFFLINE is set, "
                    f"so nothing is downloaded. Fetch it once with network access ({get}), or pass a local "
                    f"model folder")
        return (f"{head}: it is not in the Hub cache ({cache}) at this revision and the Hub could not be "
                f"reached ({str(err).splitlines()[0]}). Check the network, or fetch it where there is one ({get}) "
                f"and point HF_HUB_CACHE at that cache, or pass a local model folder")
    return f"{head}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
