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


@pytest.mark.parametrize("pipelined", [False, True], ids=["step_by_step", "pipelined"])
def test_engine_decode_step_has_one_read_and_at_most_one_upload(engine, monkeypatch, pipelined):
    """Four prompts over three slots with different lengths: rows join and finish mid-run. Pipelined is the
    CUDA loop (commit step n while step n+1 runs), forced on CPU."""
    monkeypatch.setattr(engine, "pipelined", pipelined)
    steps = per_step_traffic(engine, monkeypatch)
    params = [SamplingParams(max_new_tokens=4 + 3 * i, seed=i, threshold=0.01, ignore_eos=True) for i in range(4)]
    engine.generate_batch(PROMPTS, params)
    assert_budget(steps)


@pytest.mark.parametrize("draft_tokens", [0, 2])
def test_device_rows_track_the_host(tiny_pair, monkeypatch, draft_tokens):
    """After every step, each running request's row on the device holds exactly what the host would send
    for it: the device's advance is the host's commit (the premise of sending only rows that changed)."""
    from rsd_engine.step import row_values

    eng = Engine(*tiny_pair, device="cpu", dtype="float32", max_batch_size=3, max_seq_len=32, sampler="cpp",
                 draft_tokens=draft_tokens)
    decode, checked = eng._decode, []

    def checking(batch):
        finished = decode(batch)
        state = eng._state
        for b, r in enumerate(state.requests):
            if r.result.finish_reason:
                continue
            want = row_values(r)
            if draft_tokens:
                want["num_draft"] = eng._speculative._num_draft(r)
            got = {name: view[b].item() for name, view in state.views.items() if name in want}
            assert got == pytest.approx(want), f"request {r.index} after {len(r.result.token_ids)} tokens"
            checked.append(r.index)
        return finished

    monkeypatch.setattr(eng, "_decode", checking)
    # The longest runs into max_seq_len: num_draft shrinks on the device as the room does.
    params = [SamplingParams(max_new_tokens=5 + 9 * i, seed=i, threshold=0.01, ignore_eos=True) for i in range(4)]
    eng.generate_batch(PROMPTS, params)
    assert len(set(checked)) == 4


def test_speculative_round_has_one_read_and_at_most_one_upload(tiny_pair, monkeypatch):
    """A speculative round (draft, verify) is one step: the device sizes the next round's num_draft."""
    spec = Engine(*tiny_pair, device="cpu", dtype="float32", max_batch_size=3, max_seq_len=128, sampler="cpp",
                  draft_tokens=2)
    steps = per_step_traffic(spec, monkeypatch)
    params = [SamplingParams(max_new_tokens=6 + 4 * i, seed=i, threshold=0.01, ignore_eos=True) for i in range(4)]
    spec.generate_batch(PROMPTS, params)
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


def test_translating_prompts_reads_nothing_back(engine):
    """Prompts go into the teacher's token space id by id: against a mask on the device that was one
    blocking read per prompt token (tokens.py); the host keeps its own copy."""
    with HostTraffic(engine.device) as traffic:
        requests = engine._make_requests(PROMPTS, SamplingParams(max_new_tokens=2, seed=0))
    assert sum(len(r.teacher_prompt_ids) for r in requests) > 20
    assert traffic.reads == [] and traffic.uploads == []


def _fake(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)


def _engine_on_fake_tensors(engine):
    """Swap every tensor the decode step reads (weights, caches, masks, step state) for a fake tensor of the
    same shape, and take the engine's CUDA branch (device, Triton sampler)."""
    for model in (engine.teacher, engine.student):
        if hasattr(model, "use_triton"):  # models with a Triton forward take it, as on CUDA tensors
            model.use_triton = True
        for module in model.modules():
            for group in (module._parameters, module._buffers):
                for name, t in group.items():
                    if t is not None:
                        group[name] = _fake(t)
            for name, value in vars(module).items():
                if isinstance(value, torch.Tensor):
                    setattr(module, name, _fake(value))
    for cache in engine._caches():
        cache.k, cache.v = [_fake(t) for t in cache.k], [_fake(t) for t in cache.v]
    space = engine.space
    space.proposal_mask, space.fallback_mask = _fake(space.proposal_mask), _fake(space.fallback_mask)
    engine.sampler_masks = tuple(_fake(m) for m in engine.sampler_masks)
    engine._teacher_next, engine._teacher_advance = _fake(engine._teacher_next), _fake(engine._teacher_advance)
    state = engine._state
    state.buffers = {dtype: _fake(b) for dtype, b in state.buffers.items()}
    state._pad = {dtype: _fake(p) for dtype, p in state._pad.items()}
    state.out = _fake(state.out)
    for name, view in state.views.items():
        state.views[name] = state.buffers[view.dtype][state.names.index(name) - state.groups[view.dtype][0]]
    engine.device, engine.sampler = torch.device("cuda"), "triton"


class _NoLaunch:
    """Stands in for a Triton kernel under fake tensors: the launch (device code) is skipped, the host
    code around it runs."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class _NoKernels:
    """Stands in for a module of Triton kernels: every kernel is a _NoLaunch."""

    def __getattr__(self, name):
        return _NoLaunch()


def test_cuda_step_traces_under_fake_tensors(tiny_pair, monkeypatch):
    """The step the engine captures on CUDA (model forwards with slots, the Triton sampler's host side,
    packing, the rows' advance) traced on fake tensors, where .item()/.tolist() raise: it completes, so
    nothing inside the graph reads device data back. The fake tensors are CPU ones: a CPU-only torch
    cannot index fake CUDA tensors (its CUDA device guard is missing); the engine's device, the sampler
    backend and the Triton launch configuration are CUDA's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import rsd_engine.engine as engine_module
    import rsd_engine.sampling.triton as triton_sampler

    engine = Engine(*tiny_pair, device="cpu", dtype="float32", max_batch_size=4, max_seq_len=128,
                    sampler="reference")
    captured = {}

    class Recorder:  # the graph runner: keeps the step it would capture
        def __init__(self, step, *, buckets, enabled):
            captured.update(step=step, buckets=buckets, enabled=enabled)

    monkeypatch.setattr(engine_module, "SelfFeedingGraphs", Recorder)
    monkeypatch.setattr(triton_sampler, "_split", _NoKernels())  # the split-row kernels rsd_sample launches
    monkeypatch.setattr(triton_sampler, "_verify", _NoKernels())  # and its law and pick kernels
    monkeypatch.setattr(triton_sampler, "_launch_config", lambda device: triton_sampler.CUDA_CONFIG)
    calls = []
    real_sample = triton_sampler.rsd_sample_triton
    monkeypatch.setattr(triton_sampler, "rsd_sample_triton",
                        lambda *a, **k: calls.append(1) or real_sample(*a, **k))
    with FakeTensorMode(allow_non_fake_inputs=False), torch.inference_mode():
        _engine_on_fake_tensors(engine)
        engine._capture(128)
        assert captured["enabled"] and captured["buckets"] == [1, 2, 4]
        for bucket in captured["buckets"]:
            captured["step"](bucket)
        assert len(calls) == 3  # the Triton sampler's host code ran in every bucket's step
        with pytest.raises(Exception, match="_local_scalar_dense"):  # the trace does refuse host reads
            engine._state.out[0, 0].item()
