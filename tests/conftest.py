"""Shared test setup: offline, two threads, and tiny models built once per session (see tiny.py)."""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Before torch loads OpenMP: idle threads sleep instead of spinning, as `import rsd_engine` asks
# (rsd_engine/threads.py); on a shared machine spinning threads make every test many times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Triton kernels run under the interpreter on CPU; the variable must be set before triton is first
# imported (torch.compile imports it too), whichever test runs first.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))  # `from tiny import build_model` from any test file

import pytest  # noqa: E402
import transformers  # noqa: E402

from tiny import build_model, build_tokenizer  # noqa: E402

torch.set_num_threads(2)
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory, tiny_tokenizer_dir) -> tuple[Path, Path]:
    """(teacher_dir, student_dir): two Qwen3 models over the same tokenizer, the teacher a bit larger."""
    root = tmp_path_factory.mktemp("pair")
    teacher = build_model(root / "teacher", "qwen3", tokenizer_dir=tiny_tokenizer_dir, hidden_size=96,
                          num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=192, seed=1)
    student = build_model(root / "student", "qwen3", tokenizer_dir=tiny_tokenizer_dir, hidden_size=64,
                          num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, seed=2)
    return teacher, student


@pytest.fixture(scope="session")
def mapped_pair(tmp_path_factory, tiny_tokenizer_dir) -> tuple[Path, Path]:
    """A teacher on the base tokenizer; a student whose tokenizer adds <extra> (several teacher ids)."""
    root = tmp_path_factory.mktemp("mapped_pair")
    student_tok = build_tokenizer(root / "student_tok", extra_special_tokens=("<extra>",))
    teacher = build_model(root / "teacher", "qwen2", tokenizer_dir=tiny_tokenizer_dir, hidden_size=48, seed=5)
    student = build_model(root / "student", "qwen3", tokenizer_dir=student_tok, hidden_size=48, seed=6)
    return teacher, student


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine it makes them wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def as_ranks(monkeypatch):
    """`as_ranks(call)` runs `call()` as each rank of a 2-rank job started without a process group (each writes
    its own part, as torchrun ranks whose merge is left to `rsd merge`) and returns what each rank's call
    returned; RANK / WORLD_SIZE are unset after."""
    def run(call, world: int = 2) -> list:
        monkeypatch.delenv("MASTER_ADDR", raising=False)
        results = []
        for rank in range(world):
            with monkeypatch.context() as env:
                env.setenv("RANK", str(rank))
                env.setenv("WORLD_SIZE", str(world))
                results.append(call())
        return results
    return run


@pytest.fixture
def python_recursion_limit():
    """Python's default recursion limit (1000) for a test of JSON nested past it (~1,200 levels): torch.compile's
    Inductor raises the limit for the rest of the process, after which such a line parses and the suite's order,
    not the code, decided those tests."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    yield
    sys.setrecursionlimit(before)
