"""Triton-specific checks of the sampler kernels (kernels/rsd_split.py, and the one-program pieces of
kernels/rsd_sample.py it keeps for rows with top-k and top-p both on): they run on CPU tensors under the
interpreter, their segment loops, chunk split and radix rounds match the reference at the tile sizes CUDA
uses and at tiny ones (ties at the cut and across chunk boundaries, -inf, masks, kept sets of one id,
all-masked and flagged rows, one row per parameter family in one launch), the wrapper refuses bad input,
and every kernel compiles for CUDA without a GPU. The backend-generic tests are in test_rsd_sample.py."""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rsd_engine.randomness import step_uniforms
from rsd_engine.sampling import RowParams, rsd_sample_reference
from rsd_engine.sampling import triton as triton_backend
from rsd_engine.sampling.triton import is_interpreted, rsd_sample_triton

DEFAULTS = dict(temperature=0.7, top_k=0, top_p=0.95, threshold=0.01, check_temperature=1.0,
                student_temperature=0.7, student_top_k=0, student_top_p=0.95, proposal_trials=1)
# One row each, all in one launch: per-row parameters must not leak between programs.
FAMILIES = [
    {},
    dict(top_k=5, top_p=1.0, student_top_k=3, student_top_p=1.0, threshold=0.2),
    dict(top_p=0.6, student_top_p=0.5, threshold=0.1),
    dict(top_k=9, top_p=0.7, student_top_k=40, student_top_p=0.9, threshold=0.3),
    dict(temperature=0.0, student_temperature=0.0, threshold=0.15),
    dict(proposal_trials=4, threshold=0.12, check_temperature=0.5),
    dict(threshold=1.0, student_temperature=1.3, student_top_k=1),
    dict(threshold=0.0, temperature=1.5, top_k=1000),
]


def row_params(families):
    ints = {"top_k", "student_top_k", "proposal_trials"}
    rows = [{**DEFAULTS, **f} for f in families]
    return RowParams(**{k: torch.tensor([r[k] for r in rows], dtype=torch.int32 if k in ints else torch.float32)
                        for k in DEFAULTS})


def logits(gen, rows, n, kind):
    x = torch.randn(rows, n, generator=gen) * 2.5
    if kind == "ties":
        x = (x * 2).round() / 2  # many exact ties, at every cut
    elif kind == "bf16_values":
        x = x.to(torch.bfloat16).float()
    elif kind == "neg_inf":
        x = x.masked_fill(torch.rand(rows, n, generator=gen) < 0.4, float("-inf"))
        x[:, 0] = 1.0
    return x


def assert_same(out, ref):
    assert out.token.tolist() == ref.token.tolist()
    assert out.accepted.tolist() == ref.accepted.tolist()
    torch.testing.assert_close(out.teacher_logprob, ref.teacher_logprob, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.student_logprob, ref.student_logprob, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the kernels are compiled")
def test_kernels_run_under_the_interpreter_without_cuda():
    assert is_interpreted()


# The interpreter's own tiles put V <= 4096 in one segment, so the backend-generic tests never cross one
# there: these run the CUDA tiles, and segments small enough for many segments and chunks per row (the
# pivot search of the one-program path keeps wide tiles: its own small-tile test is below).
SMALL_TILES = dict(SEG=32, SG=4, SEARCH_BLOCK=1024, NUM_PIVOTS=64, chunks=3)
CASES = ([(kind, 300, "small") for kind in ("plain", "ties", "bf16_values", "neg_inf")]
         + [(kind, 1500, "cuda") for kind in ("plain", "ties")])


@pytest.mark.parametrize("kind, V, tiles", CASES, ids=[f"{k}-V{v}-{t}_tiles" for k, v, t in CASES])
def test_matches_reference_token_for_token(kind, V, tiles, monkeypatch):
    cuda_tiles = {k: v for k, v in triton_backend.CUDA_CONFIG.items() if k != "num_warps"}
    monkeypatch.setattr(triton_backend, "INTERPRETER_CONFIG", SMALL_TILES if tiles == "small" else cuda_tiles)
    gen = torch.Generator().manual_seed(V)
    B = len(FAMILIES)
    teacher, student = logits(gen, B, V + 3, kind), logits(gen, B, V + 9, kind)  # padding rows past V
    proposal_mask = torch.rand(V, generator=gen) > 0.1
    fallback_mask = torch.rand(V, generator=gen) > 0.1
    proposal_mask[0] = fallback_mask[0] = True
    uniforms = step_uniforms(torch.arange(B), torch.full((B,), V))
    args = (teacher, student, uniforms, row_params(FAMILIES), proposal_mask, fallback_mask)
    assert_same(rsd_sample_triton(*args), rsd_sample_reference(*args))


@pytest.mark.parametrize("B, kind", [(1, "plain"), (2, "bf16_values")])
def test_the_cards_tiles_at_a_real_vocabulary(B, kind, monkeypatch):
    """The launch a card runs: CUDA_CONFIG's tiles over V = 151,936 (37 full segments of 4096 and a partial one),
    every chunk the batch's table entry gives (B = 2: 33 chunks, 14 of them without a segment), against the
    reference. The other cases cross segments only with tiny ones, or keep V inside one segment."""
    cuda_tiles = {k: v for k, v in triton_backend.CUDA_CONFIG.items() if k != "num_warps"}
    monkeypatch.setattr(triton_backend, "INTERPRETER_CONFIG", cuda_tiles)
    V = 151_936
    assert triton_backend.chunks_for(B, -(-V // cuda_tiles["SEG"]), cuda_tiles) == (38 if B == 1 else 33)
    gen = torch.Generator().manual_seed(B)
    teacher, student = logits(gen, B, V, kind), logits(gen, B, V, kind)
    proposal_mask, fallback_mask = torch.rand(V, generator=gen) > 0.05, torch.rand(V, generator=gen) > 0.05
    proposal_mask[0] = fallback_mask[0] = True
    uniforms = step_uniforms(torch.arange(B) + 10 * B, torch.full((B,), 7))
    args = (teacher, student, uniforms, row_params(FAMILIES[:B]), proposal_mask, fallback_mask)
    assert_same(rsd_sample_triton(*args), rsd_sample_reference(*args))


def test_bad_inputs_name_the_problem():
    t, s = torch.randn(2, 10), torch.randn(2, 10)
    u = step_uniforms(torch.arange(2), torch.zeros(2, dtype=torch.long))
    mask = torch.ones(10, dtype=torch.bool)
    with pytest.raises(ValueError, match="proposal_mask"):
        rsd_sample_triton(t, s, u, row_params([{}] * 2), torch.ones(11, dtype=torch.bool), mask)
    with pytest.raises(ValueError, match="teacher_logits"):
        rsd_sample_triton(t.long(), s, u, row_params([{}] * 2), mask, mask)
    with pytest.raises(ValueError, match=r"params.temperature must have shape \[B=2\]"):
        rsd_sample_triton(t, s, u, row_params([{}] * 3), mask, mask)


# Each script runs in a child process under a timeout, so that a regression shows as a failure, not a hung suite.
EMPTY_MASKS = """
import torch
from rsd_engine.randomness import step_uniforms
from rsd_engine.sampling import RowParams
from rsd_engine.sampling.triton import rsd_sample_triton
defaults = dict(temperature=0.7, top_k=0, top_p=0.95, threshold=0.01, check_temperature=1.0,
                student_temperature=0.7, student_top_k=0, student_top_p=0.95, proposal_trials=1)
def params(**kw):
    ints = {"top_k", "student_top_k", "proposal_trials"}
    return RowParams(**{k: torch.full((1,), v, dtype=torch.int32 if k in ints else torch.float32)
                        for k, v in {**defaults, **kw}.items()})
gen = torch.Generator().manual_seed(0)
teacher, student = torch.randn(1, 50, generator=gen), torch.randn(1, 50, generator=gen)
u = step_uniforms(torch.arange(1), torch.zeros(1, dtype=torch.long))
every, none = torch.ones(50, dtype=torch.bool), torch.zeros(50, dtype=torch.bool)
print(rsd_sample_triton(teacher, student, u, params(), none, every).token.item(),
      rsd_sample_triton(teacher, student, u, params(threshold=1.0), every, none).token.item())
"""

# One pivot per pass never narrows the interval: only the pass limit ends this search.
ONE_PIVOT = """
import torch, triton, triton.language as tl
from rsd_engine.sampling.triton import import_kernel
_order_key, _search = import_kernel("rsd_sample")._order_key, import_kernel("rsd_sample")._search
@triton.jit
def probe(row_ptr, mask_ptr, out_ptr, n, BLOCK: tl.constexpr):
    lo = _order_key(tl.full((), 0.0, tl.float32))
    hi = _order_key(tl.full((), 3.0, tl.float32)) + 1
    v, count, mass, above_count, above_mass = _search(
        row_ptr, mask_ptr, n, 3.0, 1.0, 2.0, lo, hi, tl.full((), 4, tl.int32), tl.full((), 4.0, tl.float32),
        tl.full((), 0, tl.int32), tl.full((), 0.0, tl.float32), False, BLOCK, 1)
    tl.store(out_ptr, v)
out = torch.zeros(1, dtype=torch.int32)
probe[(1,)](torch.arange(4.0), torch.ones(4, dtype=torch.int8), out, 4, BLOCK=4)
print(out.item())
"""


def run_script(script, timeout=300):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    try:
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s: the kernel loops without bound")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the kernels under the interpreter")
def test_empty_masks_return_at_once():
    """No allowed id and top_p < 1 used to send the cut search into an endless loop (INT32_MAX + 1 wraps):
    an empty proposal mask falls back to the student, an empty fallback mask is flagged -3."""
    fallback, flagged = run_script(EMPTY_MASKS)
    assert int(fallback) >= 0 and int(flagged) == -3


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the kernels under the interpreter")
def test_cut_search_has_a_pass_limit():
    assert len(run_script(ONE_PIVOT)) == 1


# ---- the split-row kernels at segments of 16 ids, 4 chunks per row: every cut crosses segments and chunks ----

SPLIT_TILES = dict(SEG=16, SG=4, SEARCH_BLOCK=1024, NUM_PIVOTS=64, chunks=4, SPREAD=16)  # level-0 bins spread
# over the histogram as on CUDA (rsd_split._slot0); the other tests keep them in order (SPREAD 1)
from rsd_engine.sampling import sample_tokens_reference  # noqa: E402
from rsd_engine.sampling.triton_verify import sample_tokens_triton  # noqa: E402


def split_rows(case, B, V, gen):
    """(teacher, student, proposal_mask, fallback_mask, families) for one edge case of the contract."""
    teacher, student = torch.randn(B, V + 2, generator=gen), torch.randn(B, V + 5, generator=gen)
    every = torch.ones(V, dtype=torch.bool)
    if case == "ties_across_chunks":
        # Few distinct values, each repeated across every segment and chunk: the cuts (top-k 37, top-p 0.3
        # and 0.8) fall inside a run of ties that spans chunk boundaries; ties are kept in id order.
        teacher = (torch.randint(0, 3, (B, V + 2), generator=gen) * 0.5).float()
        student = (torch.randint(0, 2, (B, V + 5), generator=gen) * 0.25).float()
        families = [dict(top_k=37, top_p=1.0, student_top_k=50, student_top_p=1.0, threshold=0.0),
                    dict(top_p=0.3, student_top_p=0.8, threshold=1.0), dict(top_p=0.8, threshold=0.0),
                    dict(temperature=1.0, top_k=64, top_p=1.0, threshold=0.0)]
        return teacher, student, every, every, families
    if case == "kept_set_of_one":
        teacher[:, 77] += 30.0  # one id holds all the mass: top-p keeps it alone
        student[:, 130] += 30.0
        families = [dict(top_k=1, top_p=1.0, student_top_k=1, student_top_p=1.0, threshold=1.0),
                    dict(top_p=0.5, student_top_p=0.5, threshold=1.0), dict(top_p=0.5, threshold=0.0),
                    dict(temperature=0.0, student_temperature=0.0, threshold=1.0)]
        return teacher, student, every, every, families
    if case == "masked_rows":
        proposal_mask = torch.zeros(V, dtype=torch.bool)  # the teacher may propose nothing: the student writes
        fallback_mask = torch.rand(V, generator=gen) > 0.5
        student[1, :V] = float("-inf")  # ... and row 1 has no finite id the student may write: -3
        teacher[2, :V] = float("-inf")
        families = [{}, {}, dict(top_k=5, top_p=1.0, student_top_k=5, student_top_p=1.0), dict(student_top_p=0.4)]
        return teacher, student, proposal_mask, fallback_mask, families
    if case == "cut_over_the_guard":
        # Round 0 bins only the ids above the mass guard (rsd_split._mass_guard) and sums the rest: here 79
        # ids lie just under the guard's bin (live, their mass in the total) and the top-p cut falls among a
        # group of 120 ids as close above the guard as its bound allows (about 3t): a guard a few t too high
        # moves the cut.
        families = [{}, dict(temperature=1.0, top_p=0.9, student_temperature=1.0, student_top_p=0.9),
                    dict(top_p=0.99, student_top_p=0.99), dict(temperature=0.5, student_temperature=0.5, threshold=0.0)]
        rows = []
        for width, tkey, pkey in ((V + 2, "temperature", "top_p"), (V + 5, "student_temperature", "student_top_p")):
            side = torch.full((B, width), -1e4)
            for r in range(B):
                t, p = [{**DEFAULTS, **families[r]}[k] for k in (tkey, pkey)]
                guard = t * math.log((1 - p) / (16 * V))
                order = torch.randperm(V, generator=gen)
                group = order[1:121]  # together 1.2 (1 - p) / p of the top id's weight: the cut falls among them
                side[r, order[0]] = 0.0
                jitter = 0.05 * t * torch.randn(120, generator=gen)
                side[r, group] = t * math.log(1.2 * (1 - p) / p / len(group)) + jitter
                # under the guard's bin (bins span up to 1/8 of |x|), still live (weight > 2**-40)
                side[r, order[121:]] = 1.15 * guard - 0.3 * t + 0.1 * t * torch.rand(V - 121, generator=gen)
            rows.append(side)
        return rows[0], rows[1], every, every, families
    assert case == "flagged_rows"
    teacher[0, V + 1] = float("nan")  # in the padding past V: still flagged
    student[1, 3] = float("inf")
    teacher[2, 5], student[2, 6] = float("inf"), float("nan")  # both: the teacher's flag wins
    return teacher, student, every, every, [{}, dict(top_k=3, top_p=1.0), {}, dict(top_p=0.5)]


@pytest.mark.parametrize("case", ["ties_across_chunks", "kept_set_of_one", "masked_rows", "flagged_rows",
                                  "cut_over_the_guard"])
def test_split_kernels_on_the_edge_rows(case, monkeypatch):
    monkeypatch.setattr(triton_backend, "INTERPRETER_CONFIG", SPLIT_TILES)
    V = 200
    gen = torch.Generator().manual_seed(len(case))
    teacher, student, proposal_mask, fallback_mask, families = split_rows(case, 4, V, gen)
    params = row_params(families)
    for step in range(3):  # other uniforms, other draws through the same cuts
        uniforms = step_uniforms(torch.arange(4), torch.full((4,), step))
        args = (teacher, student, uniforms, params, proposal_mask, fallback_mask)
        out, ref = rsd_sample_triton(*args), rsd_sample_reference(*args)
        assert out.token.tolist() == ref.token.tolist() and out.accepted.tolist() == ref.accepted.tolist()
        for got, want in ((out.teacher_logprob, ref.teacher_logprob), (out.student_logprob, ref.student_logprob)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True)  # flagged rows: NaN
        draws = sample_tokens_triton(student, uniforms[:, 0], params.student_temperature, params.student_top_k,
                                     params.student_top_p, fallback_mask)
        assert draws.tolist() == sample_tokens_reference(student, uniforms[:, 0], params.student_temperature,
                                                         params.student_top_k, params.student_top_p,
                                                         fallback_mask).tolist()
    if case == "flagged_rows":
        assert out.token.tolist()[:3] == [-1, -2, -1]
    if case == "masked_rows":
        assert out.token[1].item() == -3 and not out.accepted.any()
    if case == "kept_set_of_one":
        assert out.token.tolist() == [130, 130, 77, 130]



def test_round_zero_bins_only_above_the_mass_guard(monkeypatch):
    """White box: after the three rounds, each top-p (row, side)'s level-0 mass histogram holds the exact
    fixed-point mass of every bin from the guard's up, nothing between bin 0 and it, and in bin 0 the sum of
    all the ids under it, so its total is the row's exact total, as is the total round 0 adds up for round 1;
    most ids were summed, not binned; and the walk's cut bin lies at or above the guard."""
    monkeypatch.setattr(triton_backend, "INTERPRETER_CONFIG", SPLIT_TILES)
    V, B = 200, 4
    teacher, student, every, _, families = split_rows("cut_over_the_guard", B, V, torch.Generator().manual_seed(3))
    params = row_params(families)
    mask = every.to(torch.int8)
    split = triton_backend._SplitLaunch(triton_backend._launch_config(teacher.device), B, teacher, student, V, V,
                                        sides=2)
    fields = [getattr(params, name).float() if name in triton_backend._FLOAT_FIELDS else getattr(params, name)
              for name in RowParams._fields]
    split.rounds(teacher, student, mask, mask, fields[4], fields[:3], fields[5:8])
    h0m, walk = split.hists[1], split.walk
    for r in range(B):
        for side, (logits, t) in enumerate(((teacher, params.temperature), (student, params.student_temperature))):
            x = logits[r, :V].numpy().astype(np.float32)
            lmax = x.max()
            w = np.exp((x - lmax) * (np.float32(1.0) / np.float32(t[r].item()))).astype(np.float32)
            fixed = (w.astype(np.float64) * 2.0 ** 40).astype(np.int64)
            bits = np.where(x == 0, np.float32(0), x).view(np.int32).astype(np.int64)
            digit = ((np.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + 2 ** 31) >> 20).astype(np.int64)
            exact = np.zeros(4096, dtype=np.int64)
            np.add.at(exact, digit, fixed)
            bins = np.arange(4096)
            got = h0m[r, side].numpy()[(bins % 16) * 256 + bins // 16]  # bin b's slot (SPREAD 16): in bin order
            guard = int(np.flatnonzero(got[1:])[0]) + 1  # the lowest bin above 0 that holds anything
            assert (got[guard:] == exact[guard:]).all()
            assert got[0] == exact[:guard].sum() and got.sum() == fixed.sum()
            assert walk[r, side, 0, 5].item() == fixed.sum()  # the row's total as round 0 adds it up (_row_size)
            assert ((digit < guard) & (fixed > 0)).sum() > V // 3  # summed per program, not binned one by one
            assert walk[r, side, 0, 1].item() >= guard  # the cut's level-0 bin


# ---- rsd_verify on the same machinery: the B * P (row, position) pairs are the split kernels' rows ----

from rsd_engine.randomness import DRAFT_DRAW, round_uniforms  # noqa: E402
from rsd_engine.sampling.triton_verify import rsd_verify_triton  # noqa: E402
from rsd_engine.sampling.verify_reference import rsd_verify_reference  # noqa: E402


@pytest.mark.parametrize("case, tile", [(case, 16) for case in ("ties_across_chunks", "ties_top_k_and_top_p",
                                                                  "kept_set_of_one", "masked_rows", "flagged_rows",
                                                                  "cut_over_the_guard")]
                         + [(case, 4) for case in ("ties_across_chunks", "ties_top_k_and_top_p", "kept_set_of_one",
                                                   "cut_over_the_guard")])
def test_split_verify_on_the_edge_rows(case, tile, monkeypatch):
    """Every position's cuts, failed and residual masses cross segments and chunks (segments of 16 ids, 4
    chunks), and with tiles of 4 the tiles of a segment (the ties kept at a cut are ranked across them, the
    residual draw carries its running mass from tile to tile): the round's tokens, flags, lengths and log-probs
    equal the reference's under the same uniforms. Drafts are the student's own draws (mostly kept) except one
    id per row that the teacher never proposes at ties (mostly rejected: the residual is drawn there)."""
    monkeypatch.setattr(triton_backend, "INTERPRETER_CONFIG", {**SPLIT_TILES, "TILE": tile})
    B, G, V = 4, 2, 200
    P = G + 1
    gen = torch.Generator().manual_seed(len(case))
    rows = [split_rows("ties_across_chunks" if case.startswith("ties") else case, B, V, gen) for _ in range(P)]
    teacher, student = torch.stack([r[0] for r in rows], 1), torch.stack([r[1] for r in rows], 1)
    proposal_mask, fallback_mask, families = rows[0][2], rows[0][3], rows[0][4]
    if case == "ties_top_k_and_top_p":  # the one-program cut of rows with both on, then per-segment kept ties
        families = [dict(top_k=60, top_p=0.5, student_top_k=45, student_top_p=0.7, threshold=0.0),
                    dict(top_k=37, top_p=0.9, threshold=1.0), dict(top_k=80, top_p=0.3, student_top_p=0.6),
                    dict(top_k=2, top_p=0.99, student_top_p=0.2, proposal_trials=3)]
    params = row_params(families)
    num_draft = torch.tensor([2, 1, 2, 0], dtype=torch.int32)
    emitted = set()
    for step in range(2):
        uniforms = round_uniforms(torch.arange(B), torch.full((B,), step * P), P)
        draft = torch.stack([sample_tokens_reference(student[:, i], uniforms[:, i, DRAFT_DRAW],
                                                     params.student_temperature, params.student_top_k,
                                                     params.student_top_p, fallback_mask) for i in range(G)], 1)
        draft = draft.clamp_min(0)
        draft[step % B, step % G] = V - 1 - step
        args = (teacher, student, draft, num_draft, uniforms, params, proposal_mask, fallback_mask)
        out, ref = rsd_verify_triton(*args), rsd_verify_reference(*args)
        assert out.num_emitted.tolist() == ref.num_emitted.tolist()
        assert out.tokens.tolist() == ref.tokens.tolist() and out.accepted.tolist() == ref.accepted.tolist()
        for got, want in ((out.teacher_logprob, ref.teacher_logprob), (out.student_logprob, ref.student_logprob)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True)
        emitted.update(out.num_emitted.tolist())
    if case == "flagged_rows":
        assert out.tokens[:3, 0].tolist() == [-1, -2, -1] and out.num_emitted[:3].tolist() == [1, 1, 1]
    if case == "masked_rows":
        assert out.tokens[1, 0].item() == -3 and not out.accepted[1].any()
    if case.startswith("ties"):
        assert len(emitted) > 1  # rounds ended at different positions: kept drafts and residual draws both ran


def test_split_verify_with_the_cards_tiles_at_a_real_vocabulary(monkeypatch):
    """rsd_verify as a card launches it (segments of 4096, tiles of 2048, V = 151,936, G = 4) against the reference:
    the other verify cases cross segments and tiles only with tiny ones."""
    from test_rsd_verify import random_round

    monkeypatch.setattr(triton_backend, "INTERPRETER_CONFIG",
                        {k: v for k, v in triton_backend.CUDA_CONFIG.items() if k != "num_warps"})
    V = 151_936
    args = random_round(1, 4, V, seed=V % 97 + 5, family="top_p")
    out, ref = rsd_verify_triton(*args), rsd_verify_reference(*args)
    assert out.num_emitted.tolist() == ref.num_emitted.tolist()
    assert out.tokens.tolist() == ref.tokens.tolist() and out.accepted.tolist() == ref.accepted.tolist()
    for got, want in ((out.teacher_logprob, ref.teacher_logprob), (out.student_logprob, ref.student_logprob)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("bad", [dict(TILE=24), dict(SPREAD=3), dict(SPREAD=0)])
def test_a_tile_or_spread_that_would_skip_or_merge_ids_is_refused(bad):
    """TILE must divide SEG (the verify kernels' tiles would skip a segment's last ids) and SPREAD the 4096
    level-0 bins (_slot0 would put two bins in one slot): wrong masses, silently, were either let through."""
    x = torch.randn(1, 300)
    with pytest.raises(AssertionError):
        triton_backend._SplitLaunch({**SPLIT_TILES, "SEG": 32, **bad}, 1, x, x, 300, 300, sides=2)
    triton_backend._SplitLaunch({**SPLIT_TILES, "SEG": 32, "TILE": 8, "SPREAD": 64}, 1, x, x, 300, 300, sides=2)


def test_chunk_table_covers_every_batch():
    """One entry per batch size, fewer chunks as the batch grows, never more chunks than segments."""
    config = triton_backend.CUDA_CONFIG
    chunks = [triton_backend.chunks_for(B, 38, config) for B in (1, 2, 16, 63, 64, 256, 4096)]
    assert chunks == sorted(chunks, reverse=True) and chunks[0] == 38 and chunks[-1] == 1
    assert triton_backend.chunks_for(1, 5, config) == 5


SPLIT_COMPILE = """
import sys
sys.path.insert(0, sys.argv[1])
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rsd_engine.sampling.triton import import_kernel
split = import_kernel("rsd_split")
types = {"sti_ptr": "*i32", "h0c_ptr": "*i32", "h1c_ptr": "*i32", "sc_ptr": "*i32", "kt_ptr": "*i32",
         "cand_ptr": "*i32", "ncand_ptr": "*i32", "h0m_ptr": "*i64", "h1m_ptr": "*i64", "sm_ptr": "*i64",
         "sa_ptr": "*i64", "walk_ptr": "*i64", "kept_ptr": "*i64", "student_ptr": "*bf16", "logits_ptr": "*fp16",
         "top_k_ptr": "*i32", "student_top_k_ptr": "*i32", "proposal_trials_ptr": "*i32", "proposal_mask_ptr": "*i8",
         "fallback_mask_ptr": "*i8", "mask_ptr": "*i8", "token_ptr": "*i64", "accepted_ptr": "*i8"}
final = dict(SEG=4096, NSP2=64, SG=16, SEARCH_BLOCK=256, NUM_PIVOTS=16)
cases = [(split.stats_kernel, dict(SEG=4096))] + [
    (split.round_kernel, dict(ROUND=r, SEG=4096, CP2=64, SPREAD=16)) for r in range(3)] + [
    (split.sample_final_kernel, final)]
for kernel, constexprs in cases:
    constexprs = {**constexprs, "PDL": False}  # as launched without programmatic dependent launch (none on sm_80)
    signature = {n: "constexpr" if n in constexprs else types.get(n, "*fp32") if n.endswith("_ptr") else "i32"
                 for n in kernel.arg_names}
    source = ASTSource(kernel, signature, {(kernel.arg_names.index(n),): v for n, v in constexprs.items()})
    for capability in (80, 90):
        triton.compile(source, target=GPUTarget("cuda", capability, 32),
                       options={"num_warps": 8, "enable_fp_fusion": False})
"""


def test_split_kernels_compile_for_cuda_without_a_gpu():
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "0"}
    done = subprocess.run([sys.executable, "-c", SPLIT_COMPILE, str(Path(__file__).resolve().parents[1])], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
