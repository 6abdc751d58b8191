"""tests/triton_device.py, which sends the Triton cases of the sampler tests to CUDA where there is one: checked
here with the "meta" device standing in for CUDA, so that it is tested on machines without a GPU too."""
import torch

import triton_device
from rsd_engine.sampling import RowParams, SampleOutput
from triton_device import engine_placement, on_triton_device, to_device


def row_params(B):
    return RowParams(*(torch.ones(B) for _ in RowParams._fields))


def test_to_device_keeps_structure_types_and_strides():
    strided = torch.randn(4, 3).t()  # a transposed view: the stride tests must keep testing strides
    value = dict(rows=[strided, 7, "x"], params=row_params(3), pair=(torch.zeros(2), None))
    moved = to_device(value, torch.device("meta"))
    assert moved["rows"][0].is_meta and moved["rows"][0].stride() == strided.stride()
    assert moved["rows"][1:] == [7, "x"]
    assert type(moved["params"]) is RowParams and all(t.is_meta for t in moved["params"])
    assert type(moved["pair"]) is tuple and moved["pair"][0].is_meta and moved["pair"][1] is None


def test_triton_calls_go_to_the_device_and_come_back(monkeypatch):
    seen = []

    def op(logits, params, mask=None, backend="reference"):
        seen.append((backend, {t.device.type for t in (logits, *params, mask)}))
        B = logits.shape[0]
        return SampleOutput(torch.zeros(B, dtype=torch.long), torch.ones(B, dtype=torch.bool), torch.zeros(B),
                            torch.zeros(B))

    wrapped = on_triton_device(op)
    args = (torch.randn(3, 5), row_params(3))
    monkeypatch.setattr(triton_device, "TRITON_DEVICE", torch.device("meta"))
    out = wrapped(*args, mask=torch.ones(5, dtype=torch.bool), backend="triton")
    assert seen == [("triton", {"meta"})]  # every tensor, keyword ones too, went to the device
    assert type(out) is SampleOutput and all(t.device.type == "cpu" for t in out)
    out = wrapped(*args, mask=torch.ones(5, dtype=torch.bool), backend="cpp")
    assert seen[-1] == ("cpp", {"cpu"}) and type(out) is SampleOutput
    monkeypatch.setattr(triton_device, "TRITON_DEVICE", torch.device("cpu"))
    wrapped(*args, mask=torch.ones(5, dtype=torch.bool), backend="triton")
    assert seen[-1] == ("triton", {"cpu"})  # no CUDA: the interpreter's CPU tensors, untouched


def test_engine_placement(monkeypatch):
    assert engine_placement("cpp") == dict(device="cpu")
    monkeypatch.setattr(triton_device, "TRITON_DEVICE", torch.device("cuda"))
    assert engine_placement("triton") == dict(device="cuda", dtype="float32")
