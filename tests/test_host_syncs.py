"""The decode loop's host traffic, counted on CPU (issue 15, item 6): at most one upload and one host
read per decode step, and none inside the step itself.

A CUDA decode step that feeds itself reads its outputs with one asynchronous copy and uploads one
patch only when rows change; every other read of device data (``.tolist()``, ``.item()``, ``bool(t)``,
a copy to the host) is a blocking sync. The same loop runs on CPU, where "the device" is the CPU and
the boundary it crosses is Python: a read is a tensor's values turned into Python objects, an upload
is a tensor made from Python values. ``HostTraffic`` counts both kinds of crossing, for either device:
  reads:   ``aten._local_scalar_dense`` (item, bool, int), ``Tensor.tolist``/``numpy`` of a tensor on the
           device, and copies from the device to another device;
  uploads: ``aten.lift_fresh`` making a tensor on the device (``torch.tensor(values)``), and copies from
           another device to it.
The CUDA branch of the step is traced under FakeTensorMode with CUDA fake tensors, where any host read
raises: a trace that completes proves the captured step reads nothing back.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rsd_engine import Engine, Generator, SamplingParams

PROMPTS = ["The answer is", "Let x be a number such that 2x + 3 = 11. Then", "1 + 1 =", "Alice has 5 apples"]

_COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default, torch.ops.aten.copy.default}


class HostTraffic(TorchDispatchMode):
    """Counts host reads and uploads of ``device``'s data while active (see the module docstring)."""

    def __init__(self, device):
        super().__init__()
        self.device = torch.device(device)
        self.reads: list[str] = []
        self.uploads: list[str] = []

    def _on_device(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.device.type == self.device.type

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default and self._on_device(args[0]):
            self.reads.append("item")
        elif func is torch.ops.aten.lift_fresh.default and self._on_device(out):
            self.uploads.append("torch.tensor")
        elif func in _COPIES:
            src = args[1] if func is not torch.ops.aten._to_copy.default else args[0]
            dst = args[0] if func is not torch.ops.aten._to_copy.default else out
            if isinstance(src, torch.Tensor) and src.device != dst.device:
                if self._on_device(src):
                    self.reads.append(f"copy to {dst.device}")
                elif self._on_device(dst):
                    self.uploads.append(f"copy from {src.device}")
        return out

    def __enter__(self):
        traffic = self
        self._saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

        def patched(name):
            original = self._saved[name]

            def read(t, *args, **kwargs):
                if traffic._on_device(t):
                    traffic.reads.append(name)
                return original(t, *args, **kwargs)
            return read

        for name in self._saved:
            setattr(torch.Tensor, name, patched(name))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)


def per_step_traffic(engine, monkeypatch):
    """Wrap ``engine._decode``: each call (one decode step for the whole batch) is counted on its own.
    Returns the list that collects (the batch's requests, reads, uploads) per step."""
    steps = []
    decode = engine._decode

    def counted(batch):
        requests = tuple(r.index for r in batch)
        with HostTraffic(engine.device) as traffic:
            finished = decode(batch)
        steps.append((requests, list(traffic.reads), list(traffic.uploads)))
        return finished

    monkeypatch.setattr(engine, "_decode", counted)
    return steps


def assert_budget(steps):
    """≤ 1 read and ≤ 1 upload every step; no upload at all where the batch is the one of the step before."""
    assert steps
    for i, (requests, reads, uploads) in enumerate(steps):
        assert len(reads) <= 1, f"step {i}: {len(reads)} host reads: {reads}"
        assert len(uploads) <= 1, f"step {i}: {len(uploads)} uploads: {uploads}"
        if i > 0 and steps[i - 1][0] == requests:
            assert not uploads, f"step {i}: the batch did not change, yet it uploaded {uploads}"
    steady = [s for i, s in enumerate(steps) if i > 0 and steps[i - 1][0] == s[0]]
    assert steady, "no steady-state step: the test must run some steps with an unchanged batch"


@pytest.fixture(scope="module")
def engine(tiny_pair):
    return Engine(*tiny_pair, device="cpu", dtype="float32", max_batch_size=3, max_seq_len=128, sampler="cpp")


def test_engine_decode_step_has_one_read_and_at_most_one_upload(engine, monkeypatch):
    """Four prompts over three slots with different lengths: rows join and finish mid-run."""
    steps = per_step_traffic(engine, monkeypatch)
    params = [SamplingParams(max_new_tokens=4 + 3 * i, seed=i, threshold=0.01, ignore_eos=True) for i in range(4)]
    engine.generate_batch(PROMPTS, params)
    assert_budget(steps)


def test_generator_decode_step_has_one_read_and_at_most_one_upload(tiny_pair, monkeypatch):
    gen = Generator(tiny_pair[1], device="cpu", dtype="float32", max_batch_size=3, max_seq_len=128)
    steps = per_step_traffic(gen, monkeypatch)
    params = [SamplingParams(max_new_tokens=4 + 3 * i, seed=i, ignore_eos=True) for i in range(4)]
    gen.generate_batch(PROMPTS, params)
    assert_budget(steps)


def test_counter_sees_every_kind_of_read_and_upload():
    """The guard itself: each way of reading device data back or sending host data counts once."""
    x = torch.arange(6)
    with HostTraffic("cpu") as traffic:
        x.tolist()
        x[0].item()
        bool(x[1])
        int(x[2])
        x.numpy()
        torch.tensor([1, 2, 3])
        x.clone()  # device work: not host traffic
    assert traffic.reads == ["tolist", "item", "item", "item", "numpy"]
    assert traffic.uploads == ["torch.tensor"]
