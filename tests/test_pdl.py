"""Programmatic dependent launch for the CUDA path's Triton kernels (kernels/pdl.py, RSD_PDL): the switch and what
the launcher passes, checked without a GPU. That every kernel so launched waits before touching memory is
tests/test_kernel_resources.py's (compiled for sm_90); that an engine launched this way (eager prefill, captured
decode graphs, draft rounds) gives the same traces bit for bit is tests/test_cuda_pdl.py's (on a card)."""
import pytest
import torch

from rsd_engine.models import load_model
from rsd_engine.models import triton_ops as ops
from rsd_engine.sampling import triton as triton_backend


@pytest.mark.parametrize("value, on", [(None, False), ("", False), ("off", False), ("0", False), (" ON ", True),
                                       ("1", True)])
def test_the_switch_reads_on_and_off(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv("RSD_PDL", raising=False)
    else:
        monkeypatch.setenv("RSD_PDL", value)
    assert ops.pdl_requested() is on
    assert ops.uses_pdl(torch.device("cpu")) is False  # never off a CUDA card


def test_an_unknown_value_is_refused_when_a_model_loads_on_cuda(monkeypatch, tiny_pair):
    monkeypatch.setenv("RSD_PDL", "yes")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a card, as far as load_model's device check knows
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"RSD_PDL='yes' is not a choice: use on or off \(1 or 0\)"):
        load_model(tiny_pair[0], device="cuda")  # refused before anything asks for a card


class _Kernel:
    """Stands in for a Triton kernel: records the launch options it is given."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, kwargs))


def test_the_launcher_asks_for_pdl_only_where_it_is_used(monkeypatch):
    kernel, x = _Kernel(), torch.zeros(4)
    monkeypatch.setattr(triton_backend, "uses_pdl", lambda device: False)
    ops._launch(kernel, (1,), x, BLOCK=4)
    monkeypatch.setattr(triton_backend, "uses_pdl", lambda device: device == x.device)
    ops._launch(kernel, (1,), x, BLOCK=4)
    assert kernel.launches == [((1,), dict(BLOCK=4)), ((1,), dict(BLOCK=4, PDL=True, launch_pdl=True))]



def test_a_triton_without_grid_dependency_control_is_named(monkeypatch):
    monkeypatch.setenv("RSD_PDL", "on")
    monkeypatch.setattr(triton_backend._pdl, "AVAILABLE", False)
    with pytest.raises(ValueError, match=r"RSD_PDL=on needs Triton 3.4 or later .*set RSD_PDL=off"):
        ops.pdl_requested()
    monkeypatch.setenv("RSD_PDL", "off")
    assert ops.pdl_requested() is False
