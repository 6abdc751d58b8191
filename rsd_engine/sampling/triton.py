"""Triton backend of the RSD-sample op: the split-row kernels of kernels/rsd_split.py (stats, three radix
rounds), then kernels/rsd_verify.py's law and pick kernels as for a round without drafts: six launches. On CUDA
tensors compiled, on CPU tensors under Triton's interpreter
(``import_kernel`` turns it on when no CUDA device is present). Same arguments and outputs as
``rsd_sample_reference``; no host sync and a launch shape fixed by (B, V), so it can sit inside a CUDA graph."""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import torch

from .checks import as_int32, check_rsd_sample_inputs
from .reference import RowParams, SampleOutput

# Split-row launches (kernels/rsd_split.py). SEG: ids per tile and per segment (a dependent step streams one
# segment); a row of V ids is ceil(V / SEG) segments, cut into `chunks` programs per row and side. The chunk
# count comes from CHUNKS_BY_BATCH (no autotune: a CUDA graph replays one fixed launch shape): about 132
# programs (one per H200 SM) while B is small, one program per row and side once B alone fills the card.
# SG: segments per step when the law (rsd_verify's law_kernel, sample_final_kernel) sums the per-segment
# histograms. SEARCH_BLOCK, NUM_PIVOTS:
# the [NUM_PIVOTS, SEARCH_BLOCK] tiles of the one-program pivot search (rows with top-k and top-p both on).
# TILE: ids at a time in rsd_verify's failed, residual and pick kernels, a divisor of SEG (SEG where absent):
# their fp64 laws of both sides over a whole segment of 4096 took 255 registers a thread and spilled 124-416
# bytes on sm_90 (bench/kernel_resources.py); tiles of 2048 take 230-252 and spill nothing.
# SPREAD: the level-0 histograms' bins b and b + 1 are kept 4096 / SPREAD slots apart (rsd_split._slot0; 1: in
# order), so that a flat row's crowded neighbouring bins are atomic targets on different cache lines.
CUDA_CONFIG = dict(SEG=4096, SG=16, SEARCH_BLOCK=256, NUM_PIVOTS=16, num_warps=8, chunks=None, TILE=2048, SPREAD=16)
# The interpreter pays per operation, not per element: wide tiles and many pivots keep it fast.
INTERPRETER_CONFIG = dict(SEG=4096, SG=16, SEARCH_BLOCK=1024, NUM_PIVOTS=256, chunks=None)
CHUNKS_BY_BATCH = ((1, 66), (2, 33), (4, 16), (8, 8), (16, 4), (32, 2), (64, 1))  # (B at least, chunks)

_FLOAT_FIELDS = ("temperature", "top_p", "threshold", "check_temperature", "student_temperature", "student_top_p")


def import_kernel(name: str):
    """``rsd_engine.kernels.<name>``: one Triton op of kernels/, installed as ``rsd_engine.kernels``.

    kernels/ has no ``__init__.py`` on purpose: a regular package named ``kernels`` at the repository root
    would shadow the Hugging Face distribution of that name (transformers imports it) for anything run
    from the root. So ``rsd_engine.kernels`` is a namespace package: a wheel installs it as such; in a
    source checkout (setuptools' editable finder does not resolve a namespace inside a mapped package,
    and a checkout may not be installed at all) pyproject's package-dir mapping is reproduced here.
    Triton reads ``TRITON_INTERPRET`` when a ``@triton.jit`` function is defined, so without a CUDA
    device it is switched on before any kernel module loads; an explicit value in the environment wins.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        return importlib.import_module(f"rsd_engine.kernels.{name}")
    except ModuleNotFoundError as err:
        if err.name not in ("rsd_engine.kernels", f"rsd_engine.kernels.{name}"):
            raise
    root = Path(__file__).resolve().parents[2] / "kernels"
    if not (root / f"{name}.py").is_file():
        raise ModuleNotFoundError(f"rsd_engine.kernels.{name} is not installed and kernels/{name}.py is not beside "
                                  "rsd_engine/: reinstall rsd-engine (`pip install -e .`)")
    spec = importlib.machinery.ModuleSpec("rsd_engine.kernels", None, is_package=True)
    spec.submodule_search_locations = [str(root)]
    sys.modules["rsd_engine.kernels"] = importlib.util.module_from_spec(spec)
    return importlib.import_module(f"rsd_engine.kernels.{name}")


# Before anything here imports triton: the interpreter is switched on first where there is no CUDA device.
_split = import_kernel("rsd_split")
_verify = import_kernel("rsd_verify")
_pdl = import_kernel("pdl")

import functools  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

PDL_ENV = "RSD_PDL"
PDL_MODES = {"off": False, "0": False, "on": True, "1": True}


def pdl_requested() -> bool:
    """RSD_PDL=on|off (1|0; default off): whether the CUDA path's Triton kernels (the decoder's and the sampler's)
    launch with programmatic dependent launch on cards that have it (kernels/pdl.py). Off until a card has
    measured it (the device check times both); refused, naming the choices, if RSD_PDL names none."""
    value = os.environ.get(PDL_ENV, "").strip().lower() or "off"
    if value not in PDL_MODES:
        raise ValueError(f"{PDL_ENV}={value!r} is not a choice: use on or off (1 or 0)")
    if PDL_MODES[value] and not _pdl.AVAILABLE:
        raise ValueError(f"{PDL_ENV}={value} needs Triton 3.4 or later (grid dependency control); this is Triton "
                         f"{triton.__version__}: upgrade it, or set {PDL_ENV}=off")
    return PDL_MODES[value]


def uses_pdl(device: torch.device) -> bool:
    """Whether a launch on ``device`` takes PDL now: requested, compiled kernels (not Triton's interpreter, which
    has no grid dependency control), and a CUDA card of compute capability 9.0 or more (Hopper on; older cards
    have no griddepcontrol)."""
    return (device.type == "cuda" and torch.cuda.is_available() and not is_interpreted() and pdl_requested()
            and _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (9, 0))


def pdl_options(device: torch.device) -> dict:
    """The launch options of a kernel that takes kernels/pdl.py's PDL constexpr: none, or PDL on."""
    return dict(PDL=True, launch_pdl=True) if uses_pdl(device) else {}


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def is_interpreted() -> bool:
    """Whether the kernels run under Triton's interpreter (CPU tensors) rather than compiled (CUDA)."""
    return isinstance(_split.stats_kernel, InterpretedFunction)


def _fast_interpreter_reductions():
    """Under the interpreter, the kernels' tuple reductions run as numpy does the built-in ones.

    Triton's interpreter runs a reduction or scan whose combine function is not one of its own (tl.sum,
    tl.max...) element by element in Python, about a thousand times slower. rsd_split's are sums of several
    values at once (numpy's sum, as the interpreter's own tl.sum: a tuple of sums gives what separate tl.sum
    calls give, as it does on the GPU, where a tuple reduction combines each value in the same tree as a lone
    one), a (bad, max, (lmax, lowest id)) combine and arg-min/max selections with payloads, whose results do not
    depend on the order of combination; the GPU compiles the combine functions themselves
    (tests/test_triton_interpreter.py compiles them for sm_80 and sm_90)."""
    import numpy as np
    from triton.runtime import interpreter

    sums = (_split._add2, _split._add3)
    reduce_impl, scan_impl = interpreter.ReduceOps.apply_impl, interpreter.ScanOps.apply_impl
    if getattr(reduce_impl, "rsd_engine", False):
        return

    def reduce(self, input):
        data = [x.handle.data for x in input]
        if any(self.combine_fn is f for f in sums):
            out = [np.sum(d, axis=self.axis, keepdims=self.keep_dims) for d in data]
        elif self.combine_fn is _split._stats_combine:
            bad, m, lmax, arg = data
            top = np.max(lmax, axis=self.axis, keepdims=True)
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN slice: NaN, as tl.max gives here
                m_max = np.nanmax(m, axis=self.axis, keepdims=self.keep_dims)  # tl.max's NaN rule
            out = [np.max(bad, axis=self.axis, keepdims=self.keep_dims), m_max,
                   np.max(lmax, axis=self.axis, keepdims=self.keep_dims),
                   np.min(np.where(lmax == top, arg, np.iinfo(np.int32).max), axis=self.axis, keepdims=self.keep_dims)]
        elif self.combine_fn is _split._first_last and all(d.ndim == 1 for d in data):
            k, p, l, q = data
            i, j = int(np.argmin(k)), int(np.argmax(l))
            out = [k[i], p[i], l[j], q[j]]
        elif self.combine_fn is _verify._hit_last_end and all(d.ndim == 1 for d in data):
            i, j = int(np.argmin(data[0])), int(np.argmax(data[3]))
            # (tl.maximum's max ignores NaN, as np.fmax does; the running masses hold none)
            out = [data[0][i], data[1][i], data[2][i], data[3][j], data[4][j], data[5][j], np.fmax.reduce(data[6])]
        elif self.combine_fn is _split._argmax_carry and all(d.ndim == 1 for d in data):
            i = int(np.argmax(data[0]))
            out = [d[i] for d in data]
        else:
            return reduce_impl(self, input)
        if self.keep_dims and np.ndim(out[0]) == 0:
            out = [np.asarray([v]) for v in out]
        return [self.to_tensor(d, x.dtype) for d, x in zip(out, input)]

    def scan(self, input):
        if not any(self.combine_fn is f for f in sums):
            return scan_impl(self, input)
        out = []
        for x in input:
            d = np.flip(x.handle.data, self.axis) if self.reverse else x.handle.data
            d = np.cumsum(d, axis=self.axis)
            out.append(self.to_tensor(np.ascontiguousarray(np.flip(d, self.axis) if self.reverse else d), x.dtype))
        return out

    reduce.rsd_engine = scan.rsd_engine = True
    interpreter.ReduceOps.apply_impl, interpreter.ScanOps.apply_impl = reduce, scan


if is_interpreted():
    _fast_interpreter_reductions()


def rsd_sample_triton(teacher_logits, student_logits, uniforms, params: RowParams, proposal_mask, fallback_mask, *,
                      check_values: bool = True) -> SampleOutput:
    check_rsd_sample_inputs(teacher_logits, student_logits, uniforms, params, proposal_mask, fallback_mask,
                            values=check_values)  # the kernels read past a wrong shape (V = 0 crashed them)
    device = teacher_logits.device
    config = _launch_config(device)
    batch = teacher_logits.shape[0]
    token = torch.empty(batch, dtype=torch.int64, device=device)
    accepted = torch.empty(batch, dtype=torch.int8, device=device)
    teacher_logprob = torch.empty(batch, dtype=torch.float32, device=device)
    student_logprob = torch.empty(batch, dtype=torch.float32, device=device)
    if batch > 0:
        teacher_logits, student_logits, uniforms = (_rows(t) for t in (teacher_logits, student_logits,
                                                                       uniforms.float()))
        row_params = [(getattr(params, name).to(device, torch.float32) if name in _FLOAT_FIELDS
                       else as_int32(getattr(params, name).to(device))).contiguous() for name in RowParams._fields]
        proposal_mask, fallback_mask = _int8(proposal_mask), _int8(fallback_mask)
        # A plain step is a verify round with no drafts (P = 1, DESIGN.md §8): after the split launches,
        # law_kernel finds both sides' cuts at once (a program per row and side) and pick_kernel draws.
        V = proposal_mask.numel()  # the fallback mask's length too (checks.py)
        split = _SplitLaunch(config, batch, teacher_logits, student_logits, V, fallback_mask.numel(), sides=2)
        split.rounds(teacher_logits, student_logits, proposal_mask, fallback_mask, row_params[4], row_params[:3],
                     row_params[5:8])
        law = (torch.empty(batch, 2, dtype=torch.int64, device=device),  # cut
               torch.empty(batch, 2, dtype=torch.int32, device=device),  # fine
               torch.empty(batch, 2, dtype=torch.float64, device=device))  # kept total
        at = torch.empty(batch, 3, dtype=torch.float64, device=device)  # zeroed by law_kernel; read for drafts only
        # Read only through draft positions, which P = 1 has none of: num_draft clamps to P - 1 = 0 whatever
        # it holds, the draft ids and the failed / residual masses are never loaded.
        no_draft = torch.empty(batch, 1, dtype=torch.int64, device=device)
        num_draft = torch.empty(batch, dtype=torch.int32, device=device)
        sides = (*row_params[:3], *row_params[5:9])  # teacher's law, student's law, trials
        constexprs = split.final_constexprs
        pick = {k: v for k, v in constexprs.items() if k not in ("SG", "SEARCH_BLOCK", "NUM_PIVOTS", "CP2")}
        _verify.law_kernel[(batch, 2)](
            teacher_logits, student_logits, num_draft, *sides, proposal_mask, fallback_mask, *split.scratch, *law,
            at, teacher_logits.shape[1], student_logits.shape[1], V, 1, teacher_logits.stride(0),
            student_logits.stride(0), split.n_seg, **{k: v for k, v in constexprs.items() if k not in ("NSP2", "CP2")},
            **split.pdl, enable_fp_fusion=False)
        _verify.pick_kernel[(batch,)](
            teacher_logits, student_logits, no_draft, num_draft, uniforms, *row_params, proposal_mask, fallback_mask,
            split.walk, *split.kept, *law, at, at, at, token.view(batch, 1), num_draft, accepted.view(batch, 1),
            teacher_logprob.view(batch, 1), student_logprob.view(batch, 1), V, 1, teacher_logits.stride(0),
            student_logits.stride(0), 1, uniforms.stride(0), uniforms.shape[1], 0, 0, split.n_seg, **pick,
            TILE=split.tile, **split.pdl, enable_fp_fusion=False)
    return SampleOutput(token, accepted.view(torch.bool), teacher_logprob, student_logprob)


def chunks_for(batch: int, n_segments: int, config) -> int:
    """Programs per row and side: the table's entry for this batch, at most one per segment."""
    if config.get("chunks"):
        return max(1, min(config["chunks"], n_segments))
    chunks = min(c for b, c in CHUNKS_BY_BATCH if batch >= b)  # the entry of the largest B at most batch
    return max(1, min(chunks, n_segments))


class _SplitLaunch:
    """Scratch and launch shape of the split-row kernels for one call: stats, then the three radix rounds
    (the law and the draws are the caller's). sides = 2 for rsd_sample, 1 for sample_tokens (side 0 only).
    Row r of the logits takes its parameters from entry r // param_div (rsd_verify: P positions per row)."""

    def __init__(self, config, batch, first, second, n_first_mask, n_second_mask, sides, param_div=1):
        seg = config["SEG"]
        device = first.device
        self.seg = seg
        # rsd_verify's failed, residual and pick kernels take a segment TILE ids at a time (their fp64 laws of
        # both sides over a whole segment held 255 registers a thread and spilled on sm_90).
        self.tile = min(config.get("TILE", seg), seg)
        assert seg % self.tile == 0, (seg, self.tile)  # a segment is whole tiles: no id of it is skipped
        self.batch, self.sides = batch, sides
        n_logits = max(first.shape[1], second.shape[1])
        self.n_seg = triton.cdiv(max(n_first_mask, n_second_mask, 1), seg)
        self.chunks = chunks_for(batch, triton.cdiv(n_logits, seg), config)
        self.spc = triton.cdiv(triton.cdiv(n_logits, seg), self.chunks)
        self.warps = {"num_warps": config["num_warps"]} if "num_warps" in config else {}
        self.pdl = pdl_options(device)  # every launch of the call, the law and the draws' too
        cp2 = triton.next_power_of_2(self.chunks)
        self.constexprs = dict(SEG=seg, **self.warps)
        spread = config.get("SPREAD", 1)
        assert spread > 0 and 4096 % spread == 0, spread  # _slot0 is a permutation of the 4096 level-0 bins
        self.round_constexprs = dict(SEG=seg, CP2=cp2, SPREAD=spread, **self.warps)
        self.final_constexprs = dict(SEG=seg, CP2=cp2, NSP2=triton.next_power_of_2(self.n_seg), SG=config["SG"],
                                     SEARCH_BLOCK=config["SEARCH_BLOCK"], NUM_PIVOTS=config["NUM_PIVOTS"],
                                     **self.warps)
        i32, i64 = torch.int32, torch.int64
        rs = (batch, 2)
        self.stats = (torch.empty(*rs, self.chunks, 4, dtype=torch.float32, device=device),
                      torch.empty(*rs, self.chunks, 2, dtype=i32, device=device))
        level = [torch.empty(*rs, 4096, dtype=dtype, device=device) for dtype in (i32, i64, i32, i64)]
        self.hists = (*level,
                      torch.empty(*rs, self.n_seg, 256, dtype=i32, device=device),
                      torch.empty(*rs, self.n_seg, 256, dtype=i64, device=device))
        self.above = torch.empty(*rs, self.n_seg, dtype=i64, device=device)
        self.candidates = (torch.empty(*rs, self.n_seg * seg, dtype=i32, device=device),
                           torch.empty(*rs, self.n_seg, dtype=i32, device=device))
        self.kept = (torch.empty(*rs, self.n_seg, dtype=i64, device=device),
                     torch.empty(*rs, self.n_seg, dtype=i32, device=device))
        # round 0 stores the sides' statistics, rounds 1 and 2 their walks' states (rsd_split._store_side, _store_walk)
        self.walk = torch.empty(*rs, 3, 6, dtype=i64, device=device)
        self.scratch = (*self.stats, *self.hists, self.above, self.walk, *self.kept)
        self.shape = (first.shape[1], second.shape[1], n_first_mask, n_second_mask, first.stride(0), second.stride(0),
                      self.chunks, self.spc, self.n_seg, param_div)

    def rounds(self, first, second, first_mask, second_mask, check_temperature, first_params, second_params):
        grid = (self.batch, self.sides, self.chunks)
        _split.stats_kernel[grid](first, second, first_mask, second_mask, check_temperature, *self.stats,
                                  *self.hists, self.walk, *self.shape, **self.constexprs, **self.pdl,
                                  enable_fp_fusion=False)
        for r in range(3):
            _split.round_kernel[grid](first, second, first_mask, second_mask, *first_params, *second_params,
                                      check_temperature, *self.stats, *self.hists, self.above, *self.candidates,
                                      self.walk, *self.shape, ROUND=r, **self.round_constexprs, **self.pdl,
                                      enable_fp_fusion=False)


def _launch_config(device):
    if not is_interpreted():
        if device.type != "cuda":
            raise ValueError(f"the triton sampler got {device.type} tensors, which need Triton's interpreter: set "
                             "TRITON_INTERPRET=1 before rsd_engine.sampling.triton is imported (automatic when no CUDA "
                             "device is present), or pass CUDA tensors")
        return CUDA_CONFIG
    if not isinstance(tl.zeros, InterpretedFunction):
        raise ValueError("triton was imported before TRITON_INTERPRET=1 was set, so its library functions cannot "
                         "run under the interpreter: export TRITON_INTERPRET=1, or import rsd_engine.sampling.triton "
                         "before anything that imports triton (torch.compile does)")
    return INTERPRETER_CONFIG


def _rows(t):
    # The kernel walks a row with unit stride; any row stride (including 0, from expand) is fine.
    return t if t.stride(-1) == 1 else t.contiguous()


def _int8(mask):
    return (mask.view(torch.int8) if mask.dtype in (torch.bool, torch.uint8) else mask).contiguous()
