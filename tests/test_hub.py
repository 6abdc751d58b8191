"""Hugging Face Hub ids as model names (models/hub.py), offline from a Hub cache each test lays out itself:
HF_HUB_CACHE/models--org--name/{blobs, refs/<ref>, snapshots/<commit>/...} as huggingface_hub writes it."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from rsd_engine import Engine, Generator, SamplingParams
from rsd_engine.cli import main
from rsd_engine.models import ModelUnavailable, load_model, resolve_model
from rsd_engine.pipeline.records import read_records
from rsd_engine.tokens import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
MAIN = "0123456789abcdef0123456789abcdef01234567"
V1 = "89abcdef0123456789abcdef0123456789abcdef"

pytestmark = pytest.mark.usefixtures("one_thread")


def lay_out(cache: Path, repo_id: str, folder: Path, commit: str = MAIN, refs=("main",), keep=lambda p: True) -> Path:
    """Put `folder`'s files in the Hub cache as snapshot `commit` of `repo_id` (blobs named by content,
    symlinked from the snapshot, as huggingface_hub stores them); `refs` point at it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for path in sorted(folder.iterdir()):
        if path.is_file() and keep(path):
            blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
            shutil.copy(path, blob)
            (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty Hub cache, offline. huggingface_hub reads its environment once, at import: the test sets
    both the variables and the constants they became (the subprocess tests below check the variables alone)."""
    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local folder spells the ids below
    return root


def greedy(model, prompts, n=6):
    return [r.token_ids for r in model.generate_batch(prompts, SamplingParams(max_new_tokens=n, temperature=0.0, seed=1,
                                                                              ignore_eos=True))]


def test_engine_and_generator_take_hub_ids(cache, tiny_pair):
    teacher_dir, student_dir = tiny_pair
    lay_out(cache, "tiny-org/teacher", teacher_dir)
    snapshot = lay_out(cache, "tiny-org/student", student_dir)
    prompts = ["The answer is", [5, 6, 7]]

    generator = Generator("tiny-org/student", device="cpu", max_batch_size=2, max_seq_len=32)
    assert generator.model_path == snapshot
    assert greedy(generator, prompts) == greedy(Generator(student_dir, device="cpu", max_batch_size=2,
                                                          max_seq_len=32), prompts)
    engine = Engine("tiny-org/teacher", "tiny-org/student", device="cpu", max_batch_size=2, max_seq_len=32,
                    teacher_revision="main")
    assert engine.student_path == snapshot and engine.teacher_path.name == MAIN
    assert greedy(engine, prompts) == greedy(Engine(teacher_dir, student_dir, device="cpu", max_batch_size=2,
                                                    max_seq_len=32), prompts)
    assert load_tokenizer("tiny-org/student").get_vocab() == load_tokenizer(student_dir).get_vocab()


def test_revisions_pick_their_snapshot(cache, tiny_pair):
    teacher_dir, student_dir = tiny_pair
    lay_out(cache, "tiny-org/model", student_dir, MAIN)
    lay_out(cache, "tiny-org/model", teacher_dir, V1, refs=("v1",))  # a tag on another commit
    assert resolve_model("tiny-org/model") == cache / "models--tiny-org--model" / "snapshots" / MAIN
    assert resolve_model("tiny-org/model", "v1").name == V1 and resolve_model("tiny-org/model", V1).name == V1
    assert load_model("tiny-org/model", revision="v1").config.hidden_size == 96  # the teacher's
    assert load_model("tiny-org/model").config.hidden_size == 64
    with pytest.raises(ModelUnavailable, match=r"^model tiny-org/model \(revision v2\) is not a local folder .*"
                                               r"not in the Hub cache \(.*hub\) at this revision, and HF_HUB_OFFLINE "
                                               r"is set.*`hf download tiny-org/model --revision v2`"):
        Generator("tiny-org/model", revision="v2", device="cpu")


def test_an_uncached_id_offline_gets_one_clear_message(cache):
    with pytest.raises(ModelUnavailable) as info:
        resolve_model("Qwen/Qwen3-0.6B")
    message = str(info.value)
    assert "\n" not in message and message.startswith("model Qwen/Qwen3-0.6B is not a local folder")
    assert "HF_HUB_OFFLINE is set" in message and "`hf download Qwen/Qwen3-0.6B`" in message


def test_pickle_only_repos_are_refused(cache, tiny_pair):
    pickled = cache.parent / "pickled"
    pickled.mkdir()
    for path in tiny_pair[1].iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, pickled / path.name)
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_model.bin")
    lay_out(cache, "tiny-org/pickled", pickled)
    with pytest.raises(ModelUnavailable, match=r"tiny-org/pickled: the Hub snapshot .* has no safetensors weights.*"
                                               r"pickle checkpoints \(\*\.bin, \*\.pt\) are never downloaded or "
                                               r"loaded"):
        Generator("tiny-org/pickled", device="cpu")


def test_only_metadata_and_safetensors_are_asked_for(cache, tiny_pair, monkeypatch):
    """What is fetched: pickle checkpoints (*.bin, *.pt, ...) and modelling code (*.py) never, whatever the repo
    holds; the weights come from the commit the metadata came from, named by its hash (a branch moved between the
    two downloads would mix two commits)."""
    import fnmatch

    import huggingface_hub

    calls, real = [], huggingface_hub.snapshot_download

    def spy(repo_id, *, revision=None, allow_patterns=None, **kwargs):
        calls.append((revision, list(allow_patterns)))
        return real(repo_id, revision=revision, allow_patterns=allow_patterns, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    lay_out(cache, "tiny-org/student", tiny_pair[1])
    resolve_model("tiny-org/student", "main")
    assert [revision for revision, _ in calls] == ["main", MAIN]
    refused = ("pytorch_model.bin", "model.pt", "consolidated.pth", "modeling_qwen3.py", "model.ckpt", "x.pkl")
    for _, patterns in calls:
        assert not [(p, name) for p in patterns for name in refused if fnmatch.fnmatch(name, p)]
    assert calls[1][1] == ["model.safetensors"]


def test_missing_shards_are_named(cache, tmp_path):
    from tiny import build_model

    sharded = build_model(tmp_path / "sharded", "qwen3", shards=2)
    first = sorted(sharded.glob("model-*.safetensors"))[0]
    lay_out(cache, "tiny-org/sharded", sharded, keep=lambda p: p != first)
    with pytest.raises(ModelUnavailable, match=rf"tiny-org/sharded: the Hub snapshot .* lacks {first.name}"):
        resolve_model("tiny-org/sharded")


@pytest.mark.parametrize("spoil", [lambda m: list(m.values()), lambda m: {**m, "model.norm.weight": 3}],
                         ids=["weight_map-list", "file-int"])
def test_a_malformed_index_is_named(cache, tmp_path, spoil):
    """Was 'the repo has no safetensors weights' (a list) or a TypeError dressed as a download failure (an int)."""
    from tiny import build_model

    sharded = build_model(tmp_path / "sharded", "qwen3", shards=2)
    path = sharded / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    path.write_text(json.dumps({**index, "weight_map": spoil(index["weight_map"])}))
    snapshot = lay_out(cache, "tiny-org/sharded", sharded)
    with pytest.raises(ValueError, match=rf"^{snapshot}/model.safetensors.index.json: weight_map must map tensor "
                                         r"names to file names$"):
        resolve_model("tiny-org/sharded")


def test_a_local_folder_wins_over_a_hub_id(cache, tiny_pair):
    lay_out(cache, "tiny-org/student", tiny_pair[1])
    local = cache.parent / "tiny-org" / "student"
    shutil.copytree(tiny_pair[0], local)
    assert resolve_model("tiny-org/student") == Path("tiny-org/student")
    assert load_model("tiny-org/student").config.hidden_size == 96  # the local copy, not the cached one
    with pytest.raises(ValueError, match="revision 'v1' was given for tiny-org/student, a local folder"):
        resolve_model("tiny-org/student", "v1")
    with pytest.raises(FileNotFoundError, match=r"model folder not found: \./nope/model"):
        resolve_model("./nope/model")


def test_cli_eval_takes_a_hub_id_and_revision(cache, tiny_pair, tmp_path, capsys):
    lay_out(cache, "tiny-org/student", tiny_pair[1], V1, refs=("v1",))
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"id": "a", "question": "What is 2 + 2?", "answer": "4"}) + "\n")
    argv = ["eval", "--model", "tiny-org/student", "--data", str(data), "--out", str(tmp_path / "g.jsonl"),
            "--max-new-tokens", "4", "--no-progress", "--device", "cpu"]
    with pytest.raises(SystemExit) as info:  # main has no such snapshot
        main(argv)
    assert info.value.code == 2 and "rsd eval: error: model tiny-org/student is not a local folder" in \
        capsys.readouterr().err
    assert main([*argv, "--revision", "v1"]) == 0
    assert [r["id"] for r in read_records(tmp_path / "g.jsonl")] == ["a"]
    with pytest.raises(SystemExit) as info:
        main(["provenance", "--teacher", str(tiny_pair[0]), "--student", str(tiny_pair[1]), "--data", str(data),
              "--out", str(tmp_path / "s.jsonl"), "--distilled-revision", "v1"])
    assert info.value.code == 2 and "--distilled-revision v1 was given without --distilled" in capsys.readouterr().err


def _rsd(*argv, env):
    """`rsd ARGV` in a fresh process whose Hub settings are `env` alone."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_OFFLINE"))}
    return subprocess.run([sys.executable, "-m", "rsd_engine.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          env={**base, **env}, timeout=300)


def test_the_environment_is_honoured(tiny_pair, tmp_path):
    """HF_HOME (its hub/ cache) and HF_HUB_OFFLINE as a user sets them; and with the network on, a Hub that
    cannot be reached is one line on stderr, no traceback."""
    lay_out(tmp_path / "hf" / "hub", "tiny-org/student", tiny_pair[1])
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"id": "a", "question": "What is 2 + 2?", "answer": "4"}) + "\n")
    argv = ["eval", "--data", str(data), "--out", str(tmp_path / "g.jsonl"), "--max-new-tokens", "3", "--no-progress",
            "--device", "cpu", "--threads", "1"]
    done = _rsd(*argv, "--model", "tiny-org/student", env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert read_records(tmp_path / "g.jsonl")[0]["id"] == "a"
    # A closed local port: the connection is refused at once.
    failed = _rsd(*argv, "--model", "tiny-org/missing", env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
                                                           "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert failed.returncode == 2
    lines = failed.stderr.strip().splitlines()
    assert "Traceback" not in failed.stderr and lines[-1].startswith(
        "rsd eval: error: model tiny-org/missing is not a local folder and could not be had from the Hugging Face "
        "Hub: it is not in the Hub cache")
    assert "the Hub could not be reached" in lines[-1] and "`hf download tiny-org/missing`" in lines[-1]
