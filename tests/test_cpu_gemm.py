"""Float32 linears on CPU through oneDNN (rsd_engine/models/cpu_gemm.py): the products F.linear gives, on the
model's own weights, and RSD_CPU_GEMM choosing between the two. (Timings: bench/bench_e2e.py --cpu-gemms.)"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from rsd_engine.models import cpu_gemm, load_model

pytestmark = pytest.mark.skipif(not cpu_gemm._onednn("onednn"), reason="this torch has no oneDNN matmul")


@pytest.fixture(autouse=True)
def onednn_for_every_size(monkeypatch):
    """The tests' matrices are small: take oneDNN for them as for a real model's (and the default choice)."""
    monkeypatch.setattr(cpu_gemm, "MIN_WEIGHT_ELEMENTS", 0)
    monkeypatch.delenv(cpu_gemm.ENV, raising=False)
    monkeypatch.setattr(cpu_gemm, "DEFAULT", "onednn")


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def ops_of(fn, *args):
    with Ops() as mode:
        out = fn(*args)
    return out, mode.names


@pytest.mark.parametrize("rows", [0, 1, 3, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_same_products_as_f_linear(rows, bias):
    torch.manual_seed(0)
    w = torch.randn(48, 32)
    b = torch.randn(48) if bias else None
    for x in (torch.randn(rows, 32), torch.randn(2, rows, 32), torch.randn(32, 2, rows).transpose(0, 2)):
        out, names = ops_of(cpu_gemm.linear, x, w, b)
        assert "mkldnn::_linear_pointwise" in names
        assert out.shape == F.linear(x, w, b).shape
        torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_blas_choice_and_other_dtypes_keep_f_linear(monkeypatch):
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    monkeypatch.setenv(cpu_gemm.ENV, "blas")
    assert "mkldnn::_linear_pointwise" not in ops_of(cpu_gemm.linear, x, w)[1]
    monkeypatch.delenv(cpu_gemm.ENV)
    assert "mkldnn::_linear_pointwise" in ops_of(cpu_gemm.linear, x, w)[1]
    for dtype in (torch.bfloat16, torch.float16):
        assert "mkldnn::_linear_pointwise" not in ops_of(cpu_gemm.linear, x.to(dtype), w.to(dtype))[1]


def test_small_matrices_keep_blas(monkeypatch):
    """Below MIN_WEIGHT_ELEMENTS oneDNN's fixed cost per call is more than BLAS's whole product."""
    monkeypatch.setattr(cpu_gemm, "MIN_WEIGHT_ELEMENTS", 1 << 18)
    x = torch.randn(2, 256)
    assert "mkldnn::_linear_pointwise" not in ops_of(cpu_gemm.linear, x, torch.randn(1023, 256))[1]
    assert "mkldnn::_linear_pointwise" in ops_of(cpu_gemm.linear, x, torch.randn(1024, 256))[1]


def test_weights_that_train_keep_autograd():
    w = torch.randn(4, 8, requires_grad=True)
    cpu_gemm.linear(torch.randn(2, 8), w).sum().backward()
    assert w.grad is not None
    b = torch.randn(4, requires_grad=True)  # a bias that trains beside a frozen weight
    cpu_gemm.linear(torch.randn(2, 8), w.detach(), b).sum().backward()
    assert b.grad is not None


def test_strided_bias_and_autocast_keep_f_linear():
    """oneDNN reads a bias as contiguous whatever its strides (a wrong product, silently); CPU autocast
    expects bf16 out of a linear."""
    x, w = torch.randn(3, 8), torch.randn(48, 8)
    for bias in (torch.randn(96)[::2], torch.randn(48, 2)[:, 0], torch.tensor(1.5).expand(48)):
        out, names = ops_of(cpu_gemm.linear, x, w, bias)
        assert "mkldnn::_linear_pointwise" not in names
        torch.testing.assert_close(out, F.linear(x, w, bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_gemm.linear(x, w).dtype == F.linear(x, w).dtype == torch.bfloat16


def test_choice_reads_any_case_and_empty_as_default(monkeypatch):
    for value, onednn in (("ONEDNN", True), (" Blas ", False), ("", True)):
        monkeypatch.setenv(cpu_gemm.ENV, value)
        assert cpu_gemm.uses_onednn() is onednn


def test_unknown_choice_is_refused_when_a_model_loads(monkeypatch, tiny_pair):
    monkeypatch.setenv(cpu_gemm.ENV, "openblas")
    with pytest.raises(ValueError, match=r"RSD_CPU_GEMM='openblas' is not a CPU GEMM choice: use one of onednn, blas"):
        load_model(tiny_pair[1])


def test_a_models_forward_takes_onednn_and_matches_blas(monkeypatch, tiny_pair):
    """Every layer's projections and the vocabulary head, on the weights as loaded (no copy)."""
    model = load_model(tiny_pair[1])
    ids = torch.tensor([[1, 5, 9, 2]])
    positions = torch.arange(4)[None]

    def forward():
        cache = model.new_cache(1, 16)
        return model.logits(model(ids, positions, cache, None, 4))

    with torch.inference_mode():
        onednn, names = ops_of(forward)
        monkeypatch.setenv(cpu_gemm.ENV, "blas")
        blas, blas_names = ops_of(forward)
    layers = model.config.num_layers
    assert names.count("mkldnn::_linear_pointwise") == 4 * layers + 1  # qkv, o, gate_up, down; the head
    assert "mkldnn::_linear_pointwise" not in blas_names
    torch.testing.assert_close(onednn, blas, rtol=1e-4, atol=1e-4)
