"""No import name of ours shadows an installed distribution, and the Triton ops import wherever rsd-engine runs.

transformers imports the Hugging Face package ``kernels`` when a model module loads. A regular package of that
name at the repository root (ours was one) shadowed it for anything run from the root: pytest, ``python -c``,
the benchmarks. kernels/ is now a namespace folder installed as ``rsd_engine.kernels``.
"""
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(code, cwd, **env):
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()


def test_top_level_folders_are_not_regular_packages():
    """Only rsd_engine/ is a package by name; kernels/, tests/, bench/ and csrc/ would shadow any distribution
    that shares their name for whatever runs from the root."""
    regular = sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "rsd_engine")
    assert regular == []


def test_hugging_face_kernels_wins_from_the_repository_root():
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the Hugging Face `kernels` distribution is not installed here")
    kernels_file, _ = run("import kernels, transformers.models.qwen3.modeling_qwen3 as m\n"
                          "print(kernels.__file__); print(m.Qwen3ForCausalLM.__name__)", cwd=ROOT)
    assert not Path(kernels_file).resolve().is_relative_to(ROOT)


KERNEL_FILES = """
from rsd_engine.sampling import triton, triton_verify
import rsd_engine.kernels.rsd_sample as sample, rsd_engine.kernels.rsd_verify as verify
print(sample.__file__); print(verify.__file__); print(triton.is_interpreted())
"""


def test_triton_ops_import_from_a_source_checkout(tmp_path):
    """A checkout that is not installed (PYTHONPATH only): the package-dir mapping is reproduced at import."""
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "rsd_engine", checkout / "rsd_engine", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "kernels", checkout / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    sample, verify, interpreted = run(KERNEL_FILES, cwd=checkout, PYTHONPATH=str(checkout))
    assert Path(sample) == checkout / "kernels" / "rsd_sample.py" and Path(verify) == checkout / "kernels" / "rsd_verify.py"
    assert interpreted == str(os.environ.get("TRITON_INTERPRET", "1") == "1")


def test_triton_ops_import_from_an_installed_wheel(tmp_path):
    """The wheel holds kernels/ as rsd_engine/kernels/ (a namespace package inside rsd_engine)."""
    # From a copy of the tracked files: a build/ folder left in the checkout would be packed as it stands.
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout: cannot tell the tracked files")
    for name in filter(None, tracked.stdout.split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(source), "-w", str(tmp_path)],
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                              str(site), *map(str, tmp_path.glob("rsd_engine-*.whl"))],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    assert not (site / "rsd_engine" / "kernels" / "__init__.py").exists()
    sample, verify, _ = run(KERNEL_FILES, cwd=tmp_path, PYTHONPATH=str(site))
    assert Path(sample) == site / "rsd_engine" / "kernels" / "rsd_sample.py"
    assert Path(verify) == site / "rsd_engine" / "kernels" / "rsd_verify.py"
