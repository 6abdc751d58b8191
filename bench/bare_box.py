"""pytest as a bare GPU box would import this repository: the CPU dry run's stand-in for that box.

The lent machine (bench/device_check.sh) has torch, triton, transformers, safetensors, numpy and pytest,
what those install with them (tokenizers, huggingface_hub, ...), and the standard library; nothing else,
and no way to install it. Here the test extra (scipy, accelerate, ...) is installed, so a test file that
imports one of those at module level collects here and fails on the box, where pytest then runs none of
its tests. Under this guard an import made by a file of this repository fails here as it would there.
Imports made by the installed packages themselves are not checked (their optional extras are their own).

    python bench/bare_box.py [--run-only PATH ...] PYTEST_ARGS

``--run-only PATH`` runs the selected tests of those files only and deselects the rest after collecting
them: the dry run collects the CUDA run's whole list (every import error shows) and runs the CPU-cheap part.
"""
from __future__ import annotations

import importlib.machinery
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOX_DISTRIBUTIONS = ("torch", "triton", "transformers", "safetensors", "numpy", "pytest")


def box_distributions() -> set[str]:
    """The box's packages and their required dependencies (no extras), as normalised distribution names."""
    names, todo = set(), list(BOX_DISTRIBUTIONS)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in names:
            continue
        names.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [re.match(r"[A-Za-z0-9._-]+", r).group() for r in requires if "extra ==" not in r]
    return names


def allowed_modules() -> set[str]:
    """Top-level import names the box has: the standard library's and those of box_distributions()."""
    box = box_distributions()
    allowed = set(sys.stdlib_module_names) | set(sys.builtin_module_names) | set(BOX_DISTRIBUTIONS)
    for module, dists in importlib.metadata.packages_distributions().items():
        if any(re.sub(r"[-_.]+", "-", d).lower() in box for d in dists):
            allowed.add(module)
    return allowed


def importer_file() -> str:
    """The file whose import statement is being run: the first frame outside the import machinery."""
    frame = sys._getframe(2)
    while frame and (frame.f_code.co_filename.startswith("<frozen") or "importlib" in frame.f_code.co_filename):
        frame = frame.f_back
    return frame.f_code.co_filename if frame else ""


class BareBoxGuard:
    """A meta-path finder that refuses, for this repository's files, the top-level modules the box lacks."""

    def __init__(self, roots=(ROOT,), allowed=None):
        self.roots = [str(Path(r).resolve()) for r in roots]
        self.allowed = allowed_modules() if allowed is None else set(allowed)

    def inside(self, path) -> bool:
        return bool(path) and any(str(path).startswith(root + "/") for root in self.roots)

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if "." in name or top in self.allowed or not self.inside(importer_file()):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name)
        if spec and (self.inside(spec.origin) or any(self.inside(p) for p in spec.submodule_search_locations or ())):
            return None  # the repository's own modules (rsd_engine, the tests' helpers, bench)
        raise ModuleNotFoundError(f"No module named {name!r} on the bare GPU box (bench/bare_box.py)", name=name)


class RunOnly:
    """Deselects, after collection, the selected tests outside the given files."""

    def __init__(self, paths):
        self.paths = [str(Path(p)) for p in paths]

    def pytest_collection_modifyitems(self, config, items):
        keep = [i for i in items if i.nodeid.split("::")[0] in self.paths]
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


def main(argv: list[str]) -> int:
    run_only = []
    while argv[:1] == ["--run-only"]:
        run_only.append(argv[1])
        argv = argv[2:]
    sys.path.insert(0, str(ROOT))  # as `python -m pytest` from the root puts it: rsd_engine
    sys.meta_path.insert(0, BareBoxGuard())
    import pytest

    return pytest.main(argv, plugins=[RunOnly(run_only)] if run_only else [])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
