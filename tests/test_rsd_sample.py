"""Every fused RSD-sample backend against the reference and against the analytic law (DESIGN.md §2-3).

One body per test, run for each backend through the ``backend`` parametrisation: "cpp" (csrc/, always
built) and "triton" (kernels/, under TRITON_INTERPRET=1 on CPU, so at the small sizes LIMITS allows).
Same uniforms in, same token out: a backend may differ from the reference only on a row where a float64
replay of the reference's decisions shows one of them within float rounding of its boundary.
"""
import math
import os
import re
import zlib

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is first imported

from law import accept_rate_matches, chi_square_pvalue, rsd_law  # noqa: E402

from triton_device import TRITON_DEVICE, on_triton_device, to_device  # noqa: E402

from rsd_engine import sampling  # noqa: E402
from rsd_engine.randomness import NUM_DRAWS, step_uniforms  # noqa: E402
from rsd_engine.sampling import (  # noqa: E402
    FLAG_REASONS, NO_ALLOWED_TOKEN, SAMPLE_FLAGGED, STUDENT_NONFINITE, TEACHER_NONFINITE, RowParams,
    rsd_sample_reference)

rsd_sample = on_triton_device(sampling.rsd_sample)  # Triton calls run on CUDA where there is one

ALPHA = 1e-3
BACKENDS = ("cpp", "triton")
# What each backend affords here. The Triton interpreter costs tens of ms per row, so it runs small
# batches and only two law cases with few draws (its token-for-token tests carry the weight).
LIMITS = {
    "reference": dict(draws=40_000, law_cases=None),  # the law test only: the contract itself
    "cpp": dict(batch=16, vocab=151_936, draws=20_000, law_cases=None),
    "triton": dict(batch=3, vocab=1_000, draws=400, law_cases=("default", "trials", "tiny_temperature")),
}
if TRITON_DEVICE.type == "cuda":  # compiled kernels afford what the C++ backend does
    LIMITS["triton"] = LIMITS["cpp"]
SHAPES = [(B, V) for B in (1, 3, 16) for V in (96, 1_000, 49_152, 151_936)]
ROUNDING = 1e-5  # relative to the row's mass: far above float32 rounding of a 150k-term sum, far below 1/V

DEFAULTS = dict(temperature=0.7, top_k=0, top_p=0.95, threshold=0.01, check_temperature=1.0,
                student_temperature=0.7, student_top_k=0, student_top_p=0.95, proposal_trials=1)
FAMILIES = {
    "default": {},
    "greedy": dict(temperature=0.0, student_temperature=0.0),
    "top_k": dict(top_k=20, top_p=1.0, student_top_k=5, student_top_p=1.0),
    "top_k_top_p": dict(top_k=200, top_p=0.7, student_top_k=50, student_top_p=0.8),
    "top_p": dict(top_p=0.5, student_top_p=0.6),
    "untruncated": dict(temperature=1.0, top_p=1.0, student_temperature=1.0, student_top_p=1.0),
    "threshold_0": dict(threshold=0.0),
    "threshold_1": dict(threshold=1.0),
    "trials": dict(proposal_trials=5, threshold=0.05),
    "check_temperature": dict(check_temperature=0.5, threshold=0.03),
    "mixed": "per-row",
}


def use_backend(backend):
    """Skips the Triton backend where it cannot import; the C++ one must be built (CI builds it)."""
    if backend == "triton":
        try:
            import rsd_engine.sampling.triton  # noqa: F401
        except ImportError as err:
            pytest.skip(f"rsd_engine.sampling.triton does not import: {err}")
    return backend


def shapes_for(shapes):
    return [pytest.param(backend, B, V, id=f"{backend}-B{B}-V{V}") for backend in BACKENDS for B, V in shapes
            if B <= LIMITS[backend]["batch"] and V <= LIMITS[backend]["vocab"]]


def row_params(B, family="default", seed=0):
    if family == "mixed":
        rng = np.random.default_rng(seed)
        choices = dict(temperature=[0.0, 0.5, 0.7, 1.0, 1.3], top_k=[0, 1, 5, 50], top_p=[1.0, 0.9, 0.5],
                       threshold=[0.0, 0.01, 0.1, 1.0], check_temperature=[1.0, 0.7],
                       student_temperature=[0.0, 0.7, 1.0], student_top_k=[0, 3], student_top_p=[1.0, 0.8],
                       proposal_trials=[1, 2, 5])
        values = {k: [rng.choice(v) for _ in range(B)] for k, v in choices.items()}
    else:
        values = {k: [v] * B for k, v in {**DEFAULTS, **FAMILIES[family]}.items()}
    ints = {"top_k", "student_top_k", "proposal_trials"}
    return RowParams(**{k: torch.tensor(np.array(v, dtype=np.float64),
                                        dtype=torch.int32 if k in ints else torch.float32) for k, v in values.items()})


def random_rows(B, V, seed, *, teacher_pad=7, student_pad=3):
    """LM-like logit rows: a broad random background, a few peaked ids, a student that partly agrees with
    the teacher, padding rows past V that would win if the masks were ignored, and masks with holes."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(B, V + teacher_pad, generator=gen) * 2
    peaks = torch.randint(0, V, (B, 6), generator=gen)
    teacher.scatter_add_(1, peaks, torch.rand(B, 6, generator=gen) * 8 + 3)
    student = torch.randn(B, V + student_pad, generator=gen) * 2
    student[:, :V] += 0.8 * teacher[:, :V]
    teacher[:, V:] += 12
    student[:, V:] += 4
    proposal_mask = torch.rand(V, generator=gen) > 0.03
    fallback_mask = torch.rand(V, generator=gen) > 0.02
    proposal_mask[:2] = fallback_mask[:2] = True
    return teacher, student, proposal_mask, fallback_mask


def uniforms_for(B, seed, step=5):
    return step_uniforms(torch.arange(B, dtype=torch.int64) + 1000 * seed, torch.full((B,), step, dtype=torch.int64))


# ---- float64 replay of the reference's decisions, to tell rounding from bugs ----

def near_cut(sorted_p, c):
    """Whether rounding could move a cut between ranks c - 1 and c of probabilities sorted in descending
    order: some kept and some dropped value differ, by no more than rounding. Exactly equal values are
    ranked by id in every precision, so a tie alone is no excuse, but the tie must not hide a near value
    behind it (kept 5 + ulp, 5 + ulp; dropped 5.0 at t = 1000: float32 makes all three equal)."""
    if not 0 < c < len(sorted_p):
        return False
    kept, dropped = sorted_p[:c], sorted_p[c:]
    a, b = kept[-1], dropped[0]
    above, below = kept[kept > b], dropped[dropped < a]
    gaps = ([above.min() - b] if len(above) else []) + ([a - below.max()] if len(below) else [])
    return any(g <= ROUNDING * a for g in gaps)


def truncated64(logits, temperature, top_k, top_p, mask):
    """(weights in id order, whether a top-k/top-p decision sits within rounding of its boundary); all
    zero on a row with no allowed finite logit."""
    x = np.where(mask, logits, -np.inf)
    n = len(x)
    if not (x > -np.inf).any():
        return np.zeros(n), False
    if temperature == 0:
        q = np.zeros(n)
        q[int(np.argmax(x))] = 1.0
        return q, False
    p = np.exp((x - x.max()) / temperature)
    order = np.lexsort((np.arange(n), -p))
    sp = p[order]
    keep = np.ones(n, dtype=bool)
    near = False
    if 0 < top_k < n:
        keep[top_k:] = False
        near |= near_cut(sp, top_k)
    kept_p = np.where(keep, sp, 0.0)
    total = kept_p.sum()
    if top_p < 1:
        before = np.cumsum(kept_p) - kept_p
        near |= bool(np.any(np.abs(before[keep] - top_p * total) <= ROUNDING * total))
        keep &= before < top_p * total
        near |= near_cut(sp, int(keep.sum()))
    q = np.zeros(n)
    q[order[keep]] = sp[keep]
    return q, near


def draw64(q, u):
    """(first id with weight whose cumulative weight reaches u * total, whether u * total is within rounding
    of a cumulative weight). u = 0 picks the first id with weight in any precision."""
    cdf = np.cumsum(q)
    target = u * cdf[-1]
    hits = np.nonzero((q > 0) & (cdf >= target))[0]
    j = int(hits[0]) if len(hits) else int(np.nonzero(q > 0)[0][-1])
    near = target > 0 and min(abs(cdf[j] - target), abs(cdf[j] - q[j] - target)) <= ROUNDING * cdf[-1]
    return j, bool(near)


def softmax64(x, temperature=1.0):
    x = np.asarray(x, dtype=np.float64)
    p = np.exp((x - x.max()) / temperature)
    return p / p.sum()


def replay64(teacher, student, u, prm, proposal_mask, fallback_mask):
    """(token, accepted, near): the reference's path for one row in float64, and whether any decision on
    it (a truncation cut, a uniform against the CDF, the check against the threshold) is within rounding."""
    V = len(proposal_mask)
    q_teacher, near = truncated64(teacher[:V], prm["temperature"], prm["top_k"], prm["top_p"], proposal_mask)
    check = softmax64(student, prm["check_temperature"])
    trials = min(prm["proposal_trials"], len(u) - 1) if q_teacher.any() else 0
    for k in range(trials):
        x, near_draw = draw64(q_teacher, u[1 + k])
        near |= near_draw or abs(check[x] - prm["threshold"]) <= ROUNDING * prm["threshold"]
        if check[x] >= prm["threshold"]:
            return x, True, near
    q_student, near_cut_ = truncated64(student[:V], prm["student_temperature"], prm["student_top_k"],
                                       prm["student_top_p"], fallback_mask)
    if not q_student.any():
        return NO_ALLOWED_TOKEN, False, near or near_cut_
    y, near_draw = draw64(q_student, u[0])
    return y, False, near or near_cut_ or near_draw


def assert_matches_reference(out, ref, teacher, student, uniforms, params, proposal_mask, fallback_mask):
    """Token for token (and accepted) except on rows whose decisions are within rounding; log-probs to
    float32 tolerance wherever the tokens agree."""
    assert out.token.dtype == torch.int64 and out.accepted.dtype == torch.bool
    assert out.teacher_logprob.dtype == torch.float32 and out.student_logprob.dtype == torch.float32
    same = (out.token == ref.token) & (out.accepted == ref.accepted)
    t64, s64 = teacher.double().numpy(), student.double().numpy()
    for r in torch.nonzero(~same).flatten().tolist():
        prm = {k: getattr(params, k)[r].item() for k in RowParams._fields}
        token, accepted, near = replay64(t64[r], s64[r], uniforms[r].double().numpy(), prm,
                                         proposal_mask.numpy(), fallback_mask.numpy())
        assert near, (f"row {r}: backend gave token {out.token[r].item()} (accepted {out.accepted[r].item()}), "
                      f"reference {ref.token[r].item()} ({ref.accepted[r].item()}), float64 replay {token} "
                      f"({accepted}), and no decision on that row is within rounding; params {prm}")
    ok = same & (ref.token >= 0)
    torch.testing.assert_close(out.teacher_logprob[ok], ref.teacher_logprob[ok], rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(out.student_logprob[ok], ref.student_logprob[ok], rtol=1e-5, atol=5e-5)
    flagged = out.token < 0
    assert not out.accepted[flagged].any()
    assert out.teacher_logprob[flagged].isnan().all() and out.student_logprob[flagged].isnan().all()
    return same


def run_both(backend, teacher, student, uniforms, params, proposal_mask, fallback_mask):
    out = rsd_sample(teacher, student, uniforms, params, proposal_mask, fallback_mask, backend=backend)
    ref = rsd_sample_reference(teacher, student, uniforms, params, proposal_mask, fallback_mask)
    return out, ref


# ---- token for token against the reference ----

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend,B,V", shapes_for(SHAPES))
def test_same_tokens_as_reference(backend, B, V, family):
    use_backend(backend)
    seed = zlib.crc32(f"{B}-{V}-{family}".encode()) % 10_000
    teacher, student, proposal_mask, fallback_mask = random_rows(B, V, seed)
    uniforms, params = uniforms_for(B, seed), row_params(B, family, seed)
    out, ref = run_both(backend, teacher, student, uniforms, params, proposal_mask, fallback_mask)
    assert_matches_reference(out, ref, teacher, student, uniforms, params, proposal_mask, fallback_mask)
    assert (ref.token >= 0).all() and (ref.token < V).all()
    if family == "threshold_0":
        assert ref.accepted.all()
    if family == "threshold_1":
        assert not ref.accepted.any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend,B,V", shapes_for([(3, 1_000), (16, 49_152), (1, 151_936)]))
def test_low_precision_logits(backend, B, V, dtype):
    use_backend(backend)
    teacher, student, proposal_mask, fallback_mask = random_rows(B, V, seed=11)
    teacher, student = teacher.to(dtype), student.to(dtype)
    uniforms = uniforms_for(B, 11)
    for family in ("default", "top_k_top_p", "mixed"):
        params = row_params(B, family, seed=3)
        out, ref = run_both(backend, teacher, student, uniforms, params, proposal_mask, fallback_mask)
        assert_matches_reference(out, ref, teacher.float(), student.float(), uniforms, params, proposal_mask,
                                 fallback_mask)


# ---- edge cases ----

@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_infinity_entries_are_never_emitted(backend):
    use_backend(backend)
    B, V = 3, 200
    teacher, student, proposal_mask, fallback_mask = random_rows(B, V, seed=5)
    gen = torch.Generator().manual_seed(5)
    teacher[torch.rand(teacher.shape, generator=gen) < 0.9] = float("-inf")
    student[torch.rand(student.shape, generator=gen) < 0.5] = float("-inf")
    teacher[:, 0] = student[:, 0] = 1.0  # at least one finite id in each row
    for family in ("default", "top_k", "untruncated", "greedy", "mixed"):
        for step in range(4):
            uniforms, params = uniforms_for(B, step, step), row_params(B, family, step)
            out, ref = run_both(backend, teacher, student, uniforms, params, proposal_mask, fallback_mask)
            assert_matches_reference(out, ref, teacher, student, uniforms, params, proposal_mask, fallback_mask)
            rows = torch.arange(B)
            emitted = torch.where(out.accepted, teacher[rows, out.token], student[rows, out.token])
            assert torch.isfinite(emitted).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_but_one_id_masked(backend):
    use_backend(backend)
    B, V = 3, 300
    teacher, student, _, _ = random_rows(B, V, seed=6)
    only_proposal, only_fallback = torch.zeros(V, dtype=torch.bool), torch.zeros(V, dtype=torch.bool)
    only_proposal[137] = True
    only_fallback[42] = True
    for family in ("default", "top_k", "greedy", "threshold_0", "threshold_1"):
        uniforms, params = uniforms_for(B, 6), row_params(B, family)
        out, ref = run_both(backend, teacher, student, uniforms, params, only_proposal, only_fallback)
        assert_matches_reference(out, ref, teacher, student, uniforms, params, only_proposal, only_fallback)
        assert torch.equal(out.token, torch.where(out.accepted, 137, 42))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lowest_ids(backend):
    use_backend(backend)
    B, V = 3, 500
    gen = torch.Generator().manual_seed(8)
    teacher = torch.randint(-2, 3, (B, V), generator=gen).float()  # five values: large tie groups
    student = torch.randint(-2, 3, (B, V), generator=gen).float()
    mask = torch.ones(V, dtype=torch.bool)
    for family in ("top_k", "top_k_top_p", "top_p", "greedy", "mixed"):
        for step in range(3):
            uniforms, params = uniforms_for(B, step, step), row_params(B, family, step)
            out, ref = run_both(backend, teacher, student, uniforms, params, mask, mask)
            assert_matches_reference(out, ref, teacher, student, uniforms, params, mask, mask)
    # Equal logits everywhere: top-k keeps the k lowest ids, argmax is id 0.
    flat = torch.zeros(B, V)
    params = row_params(B, "top_k")._replace(top_k=torch.full((B,), 7, dtype=torch.int32),
                                             threshold=torch.zeros(B))
    for step in range(5):
        out = rsd_sample(flat, flat, uniforms_for(B, step, step), params, mask, mask, backend=backend)
        assert out.accepted.all() and (out.token < 7).all()
    greedy = row_params(B, "greedy")
    out = rsd_sample(flat, flat, uniforms_for(B, 0), greedy, mask, mask, backend=backend)
    assert (out.token == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_top_p_keeps_the_top_id(backend):
    """Top-p keeps at least one id (DESIGN §2): the smallest top_p SamplingParams allows keeps the most probable id.
    (top_p = 0 is out of its (0, 1], and the ops refuse it too: test_out_of_range_values_are_refused.)"""
    use_backend(backend)
    B, V = 3, 300
    teacher, student, _, _ = random_rows(B, V, seed=11)
    mask = torch.ones(V, dtype=torch.bool)
    params = row_params(B, "default")._replace(top_p=torch.full((B,), 1e-30), student_top_p=torch.full((B,), 1e-30))
    for step in range(3):
        uniforms = uniforms_for(B, step, step)
        out, ref = run_both(backend, teacher, student, uniforms, params, mask, mask)
        assert_matches_reference(out, ref, teacher, student, uniforms, params, mask, mask)
        assert torch.equal(ref.token, torch.where(ref.accepted, teacher[:, :V].argmax(-1), student[:, :V].argmax(-1)))


@pytest.mark.parametrize("backend", ("reference",) + BACKENDS)
def test_nonfinite_rows_are_flagged_not_sampled(backend):
    use_backend(backend)
    B, V = 6, 100
    teacher, student, proposal_mask, fallback_mask = random_rows(B, V, seed=9)
    teacher[0, 17] = float("nan")
    student[1, 3] = float("inf")
    teacher[2, 5], student[2, 8] = float("inf"), float("nan")  # both bad: the teacher's flag wins
    teacher[3, V + 2] = float("nan")  # a padding row counts too
    teacher[4, :50] = float("-inf")  # -inf is a legal value, not an error
    for family in ("default", "greedy", "threshold_1"):
        uniforms, params = uniforms_for(B, 9), row_params(B, family)
        out, ref = run_both(backend, teacher, student, uniforms, params, proposal_mask, fallback_mask)
        expected = [TEACHER_NONFINITE, STUDENT_NONFINITE, TEACHER_NONFINITE, TEACHER_NONFINITE]
        assert out.token[:4].tolist() == ref.token[:4].tolist() == expected
        assert not out.accepted[:4].any()  # flagged rows carry no sample
        assert out.teacher_logprob[:4].isnan().all() and out.student_logprob[:4].isnan().all()
        assert (out.token[4:] >= 0).all()
        assert_matches_reference(out, ref, teacher, student, uniforms, params, proposal_mask, fallback_mask)


# ---- the contract at its edges: degenerate rows, extreme and ulp-spaced logits, exact boundaries ----

EDGE_BACKENDS = ("reference",) + BACKENDS
ULP5 = float(np.spacing(np.float32(5.0)))  # one float32 ulp at 5.0


def edge_params(B, **kw):
    values = {**DEFAULTS, **kw}
    ints = {"top_k", "student_top_k", "proposal_trials"}
    return RowParams(**{k: torch.full((B,), v, dtype=torch.int32 if k in ints else torch.float32)
                        for k, v in values.items()})


def assert_matches_float64(out, teacher, student, uniforms, params, proposal_mask, fallback_mask):
    """Token for token against the float64 replay of the contract, except where a decision is within rounding."""
    t64, s64 = teacher.double().numpy(), student.double().numpy()
    for r in range(teacher.shape[0]):
        prm = {k: getattr(params, k)[r].item() for k in RowParams._fields}
        token, accepted, near = replay64(t64[r], s64[r], uniforms[r].double().numpy(), prm, proposal_mask.numpy(),
                                         fallback_mask.numpy())
        assert near or (out.token[r].item(), out.accepted[r].item()) == (token, accepted), (
            f"row {r}: token {out.token[r].item()} (accepted {out.accepted[r].item()}), float64 {token} ({accepted})")


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
@pytest.mark.parametrize("family", ["default", "greedy", "top_k", "threshold_0", "trials"])
def test_no_allowed_finite_proposal_falls_back_to_the_student(backend, family):
    """An empty proposal mask, or one whose ids are all -inf: no proposal, the student writes (the Triton
    search used to loop forever on the empty mask with top_p < 1)."""
    use_backend(backend)
    B, V = 3, 50
    teacher, student, _, fallback_mask = random_rows(B, V, seed=12)
    uniforms, params = uniforms_for(B, 12), row_params(B, family)
    some = torch.zeros(V, dtype=torch.bool)
    some[[4, 9, 31]] = True
    banned = teacher.clone()
    banned[:, [4, 9, 31]] = float("-inf")
    pure_fallback = rsd_sample(teacher, student, uniforms, params._replace(threshold=torch.ones(B)), some,
                               fallback_mask, backend=backend)
    for t, mask in ((teacher, torch.zeros(V, dtype=torch.bool)), (banned, some)):
        out = rsd_sample(t, student, uniforms, params, mask, fallback_mask, backend=backend)
        assert not out.accepted.any() and (out.token >= 0).all()
        assert torch.equal(out.token, pure_fallback.token)
        assert_matches_float64(out, t, student, uniforms, params, mask, fallback_mask)


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
def test_no_allowed_finite_fallback_is_flagged(backend):
    use_backend(backend)
    B, V = 3, 50
    teacher, student, proposal_mask, _ = random_rows(B, V, seed=13)
    some = torch.zeros(V, dtype=torch.bool)
    some[[2, 7]] = True
    banned = student.clone()
    banned[:, [2, 7]] = float("-inf")
    uniforms = uniforms_for(B, 13)
    for s, mask in ((student, torch.zeros(V, dtype=torch.bool)), (banned, some)):
        for family in ("threshold_1", "greedy", "top_k_top_p"):
            params = row_params(B, family)._replace(threshold=torch.ones(B))
            out = rsd_sample(teacher, s, uniforms, params, proposal_mask, mask, backend=backend)
            assert out.token.tolist() == [NO_ALLOWED_TOKEN] * B and not out.accepted.any()
            assert out.teacher_logprob.isnan().all() and out.student_logprob.isnan().all()
        # A row that accepts a proposal never needs the fallback, so it is not flagged.
        params = row_params(B, "threshold_0")
        out = rsd_sample(teacher, s, uniforms, params, proposal_mask, mask, backend=backend)
        assert out.accepted.all() and (out.token >= 0).all()
    nan_teacher = teacher.clone()
    nan_teacher[0, 1] = float("nan")  # precedence: -1 before -3
    out = rsd_sample(nan_teacher, banned, uniforms, row_params(B, "threshold_1"), proposal_mask, some,
                     backend=backend)
    assert out.token.tolist() == [TEACHER_NONFINITE] + [NO_ALLOWED_TOKEN] * (B - 1)


def test_flag_reasons_name_every_flag():
    assert sorted(FLAG_REASONS) == sorted([TEACHER_NONFINITE, STUDENT_NONFINITE, NO_ALLOWED_TOKEN])
    assert all(code < 0 and len(reason) > 20 for code, reason in FLAG_REASONS.items())
    # -1 is also sample_tokens' flag for its one model: the words fit both.
    assert SAMPLE_FLAGGED == TEACHER_NONFINITE
    assert "teacher's" in FLAG_REASONS[SAMPLE_FLAGGED] and "one model" in FLAG_REASONS[SAMPLE_FLAGGED]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy: -inf is right
@pytest.mark.parametrize("backend", EDGE_BACKENDS)
def test_extreme_finite_logits_do_not_overflow(backend):
    """x / t overflows once |x| > FLT_MAX * t; (x - max) / t does not. The float64 law puts all mass on id 5."""
    use_backend(backend)
    B = 8
    extreme = torch.tensor([0, 1, -3e38, 2.9e38, -1, 3e38, 1e38, 2e38]).expand(B, -1)
    plain = torch.randn(B, 8, generator=torch.Generator().manual_seed(14))
    mask = torch.ones(8, dtype=torch.bool)
    uniforms = uniforms_for(B, 14)
    for teacher, student, threshold in ((extreme, plain, 0.0), (plain, extreme, 1.0)):
        for check_temperature in (1.0, 0.5):
            params = edge_params(B, threshold=threshold, check_temperature=check_temperature)
            out = rsd_sample(teacher, student, uniforms, params, mask, mask, backend=backend)
            assert out.token.tolist() == [5] * B, (teacher[0], threshold)
            logprob = out.teacher_logprob if threshold == 0 else out.student_logprob
            assert (logprob == 0).all()


def ulp_spaced(B, n, seed):
    """n logits one float32 ulp apart from 5.0 up, in a random order, the same in every row."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return (5.0 + order.double() * ULP5).float().expand(B, -1)


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
def test_tiny_temperature_follows_float64(backend):
    """t = 1e-6 over logits one ulp apart: the law is decided by the ulps, which l / t rounds away. Uniforms
    hug every boundary of the float64 CDF (3e-4 to each side: far outside rounding, well inside the error
    of l / t), plus some random rows."""
    use_backend(backend)
    V = 40
    mask = torch.ones(V, dtype=torch.bool)
    for side in ("teacher", "student"):
        tiny = ulp_spaced(1, V + 3, seed=15 if side == "teacher" else 16)
        q, _ = truncated64(tiny[0, :V].double().numpy(), np.float32(1e-6), 0, np.float32(DEFAULTS["top_p"]),
                           mask.numpy())
        edges = np.cumsum(q[q > 0])[:-1] / q.sum()
        hug = np.concatenate([edges - 3e-4, edges + 3e-4])
        B = len(hug) + (4 if backend == "triton" else 64)
        uniforms = uniforms_for(B, 15)
        uniforms[: len(hug)] = torch.tensor(hug, dtype=torch.float32)[:, None]
        noise = torch.randn(B, V + 3, generator=torch.Generator().manual_seed(15))
        tiny = tiny.expand(B, -1)
        teacher, student = (tiny, noise) if side == "teacher" else (noise, tiny)
        params = edge_params(B, temperature=1e-6, student_temperature=1e-6,
                             threshold=0.0 if side == "teacher" else 1.0)
        out = rsd_sample(teacher, student, uniforms, params, mask, mask, backend=backend)
        assert_matches_float64(out, teacher, student, uniforms, params, mask, mask)


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
def test_threshold_exactly_at_a_check_probability(backend):
    """n equal student logits give pC = 1/n exactly; threshold = float32(1/n) is accepted iff it is <= 1/n
    in exact arithmetic (n = 2, 4, 8 yes; 3, 5, 6, 7, 10 round up and no)."""
    from fractions import Fraction

    use_backend(backend)
    for n in (2, 3, 4, 5, 6, 7, 8, 10):
        threshold = np.float32(1 / n)
        exact = Fraction(float(threshold)) <= Fraction(1, n)
        logits = torch.zeros(2, n)
        mask = torch.ones(n, dtype=torch.bool)
        for family in ({}, dict(temperature=0.0)):
            params = edge_params(2, threshold=float(threshold), **family)
            out = rsd_sample(logits, logits, uniforms_for(2, n), params, mask, mask, backend=backend)
            assert out.accepted.tolist() == [exact] * 2, (n, family)


def test_the_reference_check_subtracts_the_largest_logit_in_float64():
    """pC(x) = exp((lS[x] - max lS) / tc) / sum_j ..., all in float64 from the float32 logits (reference.py).
    Student logits [a, b] with b = 2**-24, a near -3: a - b is exact in float64 but rounds to a in float32,
    which moves pC(1) = 1 / (1 + exp(a - b)) by ~3e-9, across the float32 threshold t chosen between the two.
    The teacher proposes id 1 (argmax), so the step accepts iff t <= the float64 pC(1). The reference only: the
    kernels sum float32 weights for the normaliser, and a check this close to the threshold is excused there
    (replay64's ROUNDING)."""
    backend = "reference"
    a, b = float.fromhex("-0x1.7ffff6p+1"), 2.0**-24
    threshold = float.fromhex("0x1.e7b7cap-1")
    assert float(np.float32(a)) == a and float(np.float32(threshold)) == threshold
    assert 1 / (1 + math.exp(a)) < threshold <= 1 / (1 + math.exp(a - b))  # float32 a - b would reject
    student = torch.tensor([[a, b]] * 2)
    teacher = torch.tensor([[0.0, 1.0]] * 2)
    mask = torch.ones(2, dtype=torch.bool)
    params = edge_params(2, temperature=0.0, threshold=threshold)
    out = rsd_sample(teacher, student, uniforms_for(2, 3), params, mask, mask, backend=backend)
    assert out.accepted.tolist() == [True, True] and out.token.tolist() == [1, 1]


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
def test_float32_rounding_ties_are_excused_only_there(backend):
    """At t = 1000 a one-ulp logit gap vanishes in float32 weights, so top_k = 1 may keep either id: float64
    keeps the larger, the reference the lower id. The replay excuses exactly such rows."""
    use_backend(backend)
    rows = torch.tensor([[5.0, 5.0 + ULP5, 5.0], [5.0, 5.0 + 2 * ULP5, 5.0 + 2 * ULP5], [5.0, 5.0 + 2 * ULP5, 5.0]])
    mask = torch.ones(3, dtype=torch.bool)
    params = edge_params(3, temperature=1000.0, top_k=1, threshold=0.0)
    uniforms = uniforms_for(3, 16)
    out, ref = run_both(backend, rows, rows, uniforms, params, mask, mask)
    assert_matches_reference(out, ref, rows, rows, uniforms, params, mask, mask)
    t64 = rows.double().numpy()
    prm = {k: getattr(params, k)[0].item() for k in RowParams._fields}
    assert all(replay64(t64[r], t64[r], uniforms[r].double().numpy(), prm, mask.numpy(), mask.numpy())[2]
               for r in range(3))
    # A clear gap is not excused: a wrong token there fails the comparison.
    clear = torch.tensor([[5.0, 6.0, 5.0]]).expand(3, -1)
    out, ref = run_both(backend, clear, clear, uniforms, params, mask, mask)
    assert out.token.tolist() == [1, 1, 1]
    wrong = out._replace(token=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(AssertionError, match="within rounding"):
        assert_matches_reference(wrong, ref, clear, clear, uniforms, params, mask, mask)


def test_near_cut_sees_past_an_exact_tie():
    assert near_cut(np.array([2.0, 1.0, 1.0 - 1e-9]), 2)  # tie across the cut, a near value behind it
    assert near_cut(np.array([1.0, 1.0 - 1e-9, 0.5]), 1)
    assert not near_cut(np.array([2.0, 1.0, 1.0, 0.5]), 2)  # a tie alone: broken by id everywhere
    assert not near_cut(np.array([2.0, 1.0]), 1)


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
def test_uniform_zero_draws_the_first_kept_id(backend):
    use_backend(backend)
    B, V = 2, 30
    teacher, student, _, _ = random_rows(B, V, seed=17)
    mask = torch.ones(V, dtype=torch.bool)
    mask[0] = False
    teacher[:, 1] = student[:, 1] = float("-inf")  # allowed, but no mass
    zero = torch.zeros(B, NUM_DRAWS)
    for threshold in (0.0, 1.0):
        params = edge_params(B, threshold=threshold, top_p=1.0, student_top_p=1.0)
        out = rsd_sample(teacher, student, zero, params, mask, mask, backend=backend)
        assert out.token.tolist() == [2] * B and out.accepted.tolist() == [threshold == 0.0] * B


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
def test_any_vocabulary_stride_is_accepted(backend):
    use_backend(backend)
    B, V = 3, 64
    teacher, student, proposal_mask, fallback_mask = random_rows(B, V, seed=18)
    strided_t, strided_s = teacher.t().contiguous().t(), student.t().contiguous().t()
    assert strided_t.stride(1) == B
    uniforms, params = uniforms_for(B, 18), row_params(B, "mixed", 18)
    out = rsd_sample(strided_t, strided_s, uniforms, params, proposal_mask, fallback_mask, backend=backend)
    same = rsd_sample(teacher, student, uniforms, params, proposal_mask, fallback_mask, backend=backend)
    for a, b in zip(out, same):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
def test_single_column_uniforms_mean_no_proposal(backend):
    use_backend(backend)
    B, V = 3, 64
    teacher, student, proposal_mask, fallback_mask = random_rows(B, V, seed=19)
    uniforms, params = uniforms_for(B, 19), row_params(B, "default")
    out = rsd_sample(teacher, student, uniforms[:, :1], params, proposal_mask, fallback_mask, backend=backend)
    rejected = rsd_sample(teacher, student, uniforms, params._replace(threshold=torch.ones(B)), proposal_mask,
                          fallback_mask, backend=backend)
    assert not out.accepted.any() and torch.equal(out.token, rejected.token)
    with pytest.raises(ValueError, match="uniforms"):
        rsd_sample(teacher, student, uniforms[:, :0], params, proposal_mask, fallback_mask, backend=backend)


# ---- the analytic law ----

LAW_CASES = {
    "default": {},
    "top_p": dict(top_p=0.6, student_top_p=0.7),
    "top_k": dict(top_k=4, student_top_k=3, top_p=1.0),
    "trials": dict(proposal_trials=3, threshold=0.08),
    "check_temperature": dict(check_temperature=0.5, threshold=0.05),
    "greedy_fallback": dict(student_temperature=0.0, threshold=0.1),
    # t = 1e-6 over logits one float32 ulp apart (the teacher's, then the student's): l / t rounds the law away.
    "tiny_temperature": dict(temperature=1e-6, threshold=0.0),
    "tiny_temperature_fallback": dict(student_temperature=1e-6, threshold=1.0),
}


@pytest.mark.parametrize("backend,case", [
    pytest.param(backend, case, id=f"{backend}-{case}") for backend in ("reference",) + BACKENDS for case in LAW_CASES
    if LIMITS[backend]["law_cases"] is None or case in LIMITS[backend]["law_cases"]])
def test_follows_the_law(backend, case):
    """Rows of the same logits with different seeds: tokens follow Q_K (chi-square), accepts 1 - r^K."""
    use_backend(backend)
    draws = LIMITS[backend]["draws"]
    gen = torch.Generator().manual_seed(21)
    V = 40
    teacher = torch.randn(V + 3, generator=gen) * 2
    student = torch.randn(V + 5, generator=gen) * 2
    proposal_mask = torch.ones(V, dtype=torch.bool)
    proposal_mask[[3, 11]] = False
    fallback_mask = torch.ones(V, dtype=torch.bool)
    fallback_mask[5] = False
    if case == "tiny_temperature":
        teacher = ulp_spaced(1, V + 3, seed=21)[0]
    if case == "tiny_temperature_fallback":
        student = ulp_spaced(1, V + 5, seed=22)[0]
    kw = {**DEFAULTS, **LAW_CASES[case]}
    params = RowParams(**{k: torch.full((draws,), v, dtype=torch.int32 if isinstance(v, int) else torch.float32)
                          for k, v in kw.items()})
    uniforms = step_uniforms(torch.arange(draws) * 7 + 3, torch.full((draws,), 2))
    out = rsd_sample(teacher.expand(draws, -1), student.expand(draws, -1), uniforms, params, proposal_mask,
                     fallback_mask, backend=backend)
    trials = kw.pop("proposal_trials")
    law, accept_rate = rsd_law(teacher.numpy(), student.numpy(), trials=trials, proposal_mask=proposal_mask.numpy(),
                               fallback_mask=fallback_mask.numpy(), **kw)
    assert chi_square_pvalue(out.token.numpy(), law) > ALPHA
    assert accept_rate_matches(out.accepted.numpy(), accept_rate), (out.accepted.float().mean().item(), accept_rate)


# ---- the C++ backend's own plumbing ----

def small_batch(B=4, V=64):
    teacher, student, proposal_mask, fallback_mask = random_rows(B, V, seed=1)
    return teacher, student, uniforms_for(B, 1), row_params(B), proposal_mask, fallback_mask


def test_cpp_every_instruction_set_build_agrees():
    """The portable, AVX2 and AVX-512 builds of the kernel (those this CPU runs) each match the reference:
    every family, low precision, tie-heavy rows, and a single row split across threads."""
    from rsd_engine import _C

    cases = []
    teacher, student, proposal_mask, fallback_mask = random_rows(16, 49_152, seed=4)
    for family in FAMILIES:
        cases.append((teacher, student, row_params(16, family, seed=4), proposal_mask, fallback_mask))
    for dtype in (torch.float16, torch.bfloat16):
        cases.append((teacher.to(dtype), student.to(dtype), row_params(16, "mixed", seed=5), proposal_mask,
                      fallback_mask))
    ties = torch.randint(-2, 3, (2, 16, 3_000), generator=torch.Generator().manual_seed(4)).float()
    cases.append((ties[0], ties[1], row_params(16, "mixed", seed=6), proposal_mask[:3_000], fallback_mask[:3_000]))
    one_row = random_rows(1, 151_936, seed=4)
    cases.append((one_row[0], one_row[1], row_params(1), one_row[2], one_row[3]))
    refs = [rsd_sample_reference(t, s, uniforms_for(t.shape[0], 4), p, pm, fm) for t, s, p, pm, fm in cases]
    current = _C.isa()
    try:
        for isa in _C.available_isas():
            _C.set_isa(isa)
            for (t, s, params, pm, fm), ref in zip(cases, refs):
                uniforms = uniforms_for(t.shape[0], 4)
                out = rsd_sample(t, s, uniforms, params, pm, fm, backend="cpp")
                assert_matches_reference(out, ref, t.float(), s.float(), uniforms, params, pm, fm)
        with pytest.raises(ValueError, match="not available"):
            _C.set_isa("sse9")
    finally:
        _C.set_isa(current)


def test_cpp_strided_rows_and_expanded_params():
    teacher, student, uniforms, params, proposal_mask, fallback_mask = small_batch()
    wide = torch.zeros(4, 200)
    wide[:, 10:10 + teacher.shape[1]] = teacher
    view = wide[:, 10:10 + teacher.shape[1]]  # row stride 200, unit stride along the vocabulary
    expanded = params._replace(temperature=torch.tensor(0.7).expand(4))
    out = rsd_sample(view, student, uniforms, expanded, proposal_mask, fallback_mask, backend="cpp")
    ref = rsd_sample_reference(teacher, student, uniforms, params, proposal_mask, fallback_mask)
    assert torch.equal(out.token, ref.token)


# ---- bad input: every backend refuses it with the same message (checks.py) ----

@pytest.mark.parametrize("backend", EDGE_BACKENDS)
@pytest.mark.parametrize("change,message", [
    (lambda a: a.update(teacher=a["teacher"].double()), "dtype"),
    (lambda a: a.update(student=a["student"][:2]), "rows"),
    (lambda a: a.update(uniforms=a["uniforms"].double()), "uniforms"),
    (lambda a: a.update(proposal_mask=a["proposal_mask"].int()), "bool"),
    (lambda a: a.update(fallback_mask=a["fallback_mask"][:-1]), "fallback_mask"),
    (lambda a: a.update(proposal_mask=a["proposal_mask"][:-5]), "fallback_mask has 64 entries but proposal_mask "
                                                                 "has 59"),
    (lambda a: a.update(proposal_mask=torch.ones(500, dtype=torch.bool),
                        fallback_mask=torch.ones(500, dtype=torch.bool)), "min"),
    (lambda a: a.update(params=a["params"]._replace(top_k=torch.zeros(3, dtype=torch.int32))), "top_k"),
    (lambda a: a.update(params=a["params"]._replace(top_k=torch.zeros(4))), "params.top_k must be an integer"),
    (lambda a: a.update(params=tuple(a["params"])), "RowParams"),
])
def test_refuses_bad_input_with_a_message(backend, change, message):
    """The reference raised torch's own errors here (an IndexError on a batch mismatch, masked_fill_ on an int
    mask, an AttributeError on a tuple) and took masks of different lengths, as Triton did (padding the shorter)."""
    use_backend(backend)
    teacher, student, uniforms, params, proposal_mask, fallback_mask = small_batch()
    args = dict(teacher=teacher, student=student, uniforms=uniforms, params=params, proposal_mask=proposal_mask,
                fallback_mask=fallback_mask)
    change(args)
    with pytest.raises(ValueError, match=message):
        rsd_sample(args["teacher"], args["student"], args["uniforms"], args["params"], args["proposal_mask"],
                   args["fallback_mask"], backend=backend)


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
def test_empty_vocabulary_is_refused(backend):
    """V = 0: the Triton kernels crashed the process (exit 139), C++ and the reference said other things."""
    use_backend(backend)
    teacher, student, uniforms, params, proposal_mask, fallback_mask = small_batch()
    with pytest.raises(ValueError, match=r"teacher_logits has an empty vocabulary \(shape \(4, 0\)\)"):
        rsd_sample(teacher[:, :0], student[:, :0], uniforms, params, proposal_mask[:0], fallback_mask[:0],
                   backend=backend)
    with pytest.raises(ValueError, match=r"proposal_mask covers V=0 ids, which must be in \[1, 67\]"):
        rsd_sample(teacher, student, uniforms, params, proposal_mask[:0], fallback_mask[:0], backend=backend)


OUT_OF_RANGE = [  # (field, value, what the message says is allowed): SamplingParams' ranges (params.RANGES)
    ("temperature", -1.0, r"0 \(argmax\) or in \[1e-30, 1e\+30\]"),
    ("temperature", float("nan"), r"0 \(argmax\) or in"),
    ("temperature", float("inf"), r"0 \(argmax\) or in"),
    ("temperature", 1e-35, r"0 \(argmax\) or in"),
    ("student_temperature", -1.0, r"0 \(argmax\) or in"),
    ("check_temperature", 0.0, r"in \[1e-30, 1e\+30\]"),
    ("top_p", 0.0, r"in \(0, 1\]"),
    ("top_p", 1.5, r"in \(0, 1\]"),
    ("student_top_p", float("nan"), r"in \(0, 1\]"),
    ("top_k", -1, r"an integer >= 0"),
    ("student_top_k", -3, r"an integer >= 0"),
    ("threshold", 1.5, r"in \[0, 1\]"),
    ("threshold", float("nan"), r"in \[0, 1\]"),
    ("threshold", -0.5, r"in \[0, 1\]"),
    ("proposal_trials", 0, r"an integer in \[1, 16\]"),
    ("proposal_trials", -5, r"an integer in \[1, 16\]"),
    ("proposal_trials", 17, r"an integer in \[1, 16\]"),
]


def _triton_args(backend, *tensors):
    """The call's tensors on the Triton device, except the row parameters (last), which stay on the CPU: a CUDA
    call checks the values of exactly those (checks.py)."""
    if backend != "triton":
        return tensors
    return (*to_device(tensors[:-1], TRITON_DEVICE), tensors[-1])


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
@pytest.mark.parametrize("field,value,allowed", OUT_OF_RANGE, ids=[f"{f}={v}" for f, v, _ in OUT_OF_RANGE])
def test_out_of_range_values_are_refused(backend, field, value, allowed):
    """Values SamplingParams refuses are refused by the op too, naming the entry: the backends returned tokens for
    them, and different ones (top_p = 0, NaN temperature: the reference and C++ one token, Triton a flag)."""
    _refused_with(backend, field, value, rf"params\.{field}\[2\] = \S+ is out of range: must be {allowed}")


def _refused_with(backend, field, value, message):
    """rsd_sample on small_batch with row 2's `field` set to `value` raises a ValueError matching `message`."""
    use_backend(backend)
    teacher, student, uniforms, params, proposal_mask, fallback_mask = small_batch()
    row = getattr(params, field).clone()
    row[2] = value
    params = params._replace(**{field: row})
    teacher, student, uniforms, proposal_mask, fallback_mask, params = _triton_args(
        backend, teacher, student, uniforms, proposal_mask, fallback_mask, params)
    with pytest.raises(ValueError, match=message):
        sampling.rsd_sample(teacher, student, uniforms, params, proposal_mask, fallback_mask, backend=backend)


NEAR_A_BOUND = [("top_p", 1.0000001, "1.0000001"), ("student_top_p", 1.0000001, "1.0000001"),
                ("threshold", 1.0000001, "1.0000001"), ("threshold", -1e-7, "-1e-07")]


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
@pytest.mark.parametrize("field,value,shown", NEAR_A_BOUND, ids=[f"{f}={v!r}" for f, v, _ in NEAR_A_BOUND])
def test_a_value_just_past_a_bound_is_shown_as_it_is(backend, field, value, shown):
    """The message shows the refused value with the digits that make it out of range: top_p = float32(1.0000001) was
    refused as "top_p[2] = 1 is out of range: must be in (0, 1]" (found by the differential fuzzer)."""
    _refused_with(backend, field, value, rf"^params\.{field}\[2\] = {re.escape(shown)} is out of range")


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), -0.25, 1.5, float("inf")])
def test_uniforms_outside_the_unit_interval_are_refused(backend, value):
    """NaN uniforms: the reference flagged the rows (-3), C++ and Triton drew tokens. Checked on CPU only (on CUDA
    the uniforms are not read: a host sync)."""
    use_backend(backend)
    if backend == "triton" and TRITON_DEVICE.type == "cuda":
        pytest.skip("CUDA uniforms are never read back")
    teacher, student, uniforms, params, proposal_mask, fallback_mask = small_batch()
    uniforms[1, 3] = value
    with pytest.raises(ValueError, match=r"uniforms\[1, 3\] = \S+ is out of range: must be in \[0, 1\]"):
        rsd_sample(teacher, student, uniforms, params, proposal_mask, fallback_mask, backend=backend)


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
def test_the_edges_of_every_range_are_accepted(backend):
    """temperature 0 (argmax), top_k 0 (off) and past V, top_p 1, threshold 0 and 1, 16 trials, the extreme
    temperatures, uniforms 0 and 1: legal values sample as before."""
    use_backend(backend)
    teacher, student, uniforms, params, proposal_mask, fallback_mask = small_batch()
    edges = dict(temperature=[0.0, 1e-30, 1e30, 0.7], top_k=[0, 10**12, 1, 0], top_p=[1.0, 1e-30, 0.5, 1.0],
                 threshold=[0.0, 1.0, 0.0, 1.0], check_temperature=[1e-30, 1e30, 1.0, 1.0],
                 student_temperature=[0.0, 1e30, 1e-30, 0.7], student_top_k=[0, 1, 10**12, 0],
                 student_top_p=[1e-30, 1.0, 1.0, 0.5], proposal_trials=[16, 1, 5, 16])
    params = RowParams(**{k: torch.tensor(v, dtype=getattr(params, k).dtype if k not in ("top_k", "student_top_k")
                                          else torch.int64) for k, v in edges.items()})
    uniforms[:, 0], uniforms[0, 1:], uniforms[1, 1:] = 1.0, 0.0, 1.0
    out = rsd_sample(teacher, student, uniforms, params, proposal_mask, fallback_mask, backend=backend)
    assert (out.token >= 0).all()


def test_a_cuda_call_reads_only_its_cpu_row_parameters():
    """The value checks never read a tensor off the CPU (a host sync inside a CUDA graph): here "meta" tensors,
    which have no values to read, stand for CUDA ones. Row parameters on the CPU are still checked."""
    from rsd_engine.sampling.checks import check_rsd_sample_inputs

    teacher, student, uniforms, params, proposal_mask, fallback_mask = small_batch()
    on_meta = [t.to("meta") for t in (teacher, student, uniforms, proposal_mask, fallback_mask)]
    check_rsd_sample_inputs(*on_meta[:3], to_device(params, "meta"), *on_meta[3:])
    check_rsd_sample_inputs(*on_meta[:3], params, *on_meta[3:])
    bad = params._replace(threshold=torch.full((4,), float("nan")))
    with pytest.raises(ValueError, match=r"params\.threshold\[0\] = nan"):
        check_rsd_sample_inputs(*on_meta[:3], bad, *on_meta[3:])
    check_rsd_sample_inputs(*on_meta[:3], bad, *on_meta[3:], values=False)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own, raised while inductor imports
def test_cpp_decode_step_compiles_fullgraph():
    """The op is one opaque node: a step computing uniforms and sampling compiles with no graph break."""
    teacher, student, _, params, proposal_mask, fallback_mask = small_batch(B=3, V=1_000)
    seeds, steps = torch.tensor([1, 2, 3]), torch.tensor([0, 4, 9])

    def step(teacher, student, seeds, steps, params, proposal_mask, fallback_mask):
        uniforms = step_uniforms(seeds, steps)
        return rsd_sample(teacher * 1.0, student, uniforms, params, proposal_mask, fallback_mask, backend="cpp")

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    out = compiled(teacher, student, seeds, steps, params, proposal_mask, fallback_mask)
    eager = step(teacher, student, seeds, steps, params, proposal_mask, fallback_mask)
    for a, b in zip(out, eager):
        assert torch.equal(a, b)
    assert NUM_DRAWS == step_uniforms(seeds, steps).shape[1]


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_it(backend):
    """Top-p keeps the smallest set of most probable ids whose mass is >= top_p (DESIGN §2). Over four equal logits
    top_p = 0.5 keeps ids 0 and 1 (ties by lower id): their mass 0.5 reaches 0.5 exactly, so id 2 is not kept. The
    draw takes the first kept id whose cumulative mass is >= u * total: u = 0.1, 0.5 give id 0; u = 0.75, 1 id 1."""
    use_backend(backend)
    B, V = 4, 4
    logits = torch.zeros(B, V)
    mask = torch.ones(V, dtype=torch.bool)
    uniforms = torch.tensor([0.1, 0.5, 0.75, 1.0])[:, None].expand(B, NUM_DRAWS).contiguous()
    for threshold in (0.0, 1.0):  # the teacher's proposal, then the student's fallback
        params = edge_params(B, temperature=1.0, student_temperature=1.0, top_p=0.5, student_top_p=0.5,
                             threshold=threshold)
        out = rsd_sample(logits, logits, uniforms, params, mask, mask, backend=backend)
        assert out.token.tolist() == [0, 0, 1, 1] and out.accepted.tolist() == [threshold == 0.0] * B


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_unchecked_top_p_zero_still_keeps_the_top_id(backend):
    """Top-p keeps at least one id (DESIGN §2). top_p = 0 is out of range, but a call whose values go unread
    (check_values=False) still samples the most probable id, as top_p -> 0 does: so reference.py says of itself and
    the C++ op. (Triton flags such rows instead; no legal input reaches this.)"""
    B, V = 3, 50
    teacher, student, _, _ = random_rows(B, V, seed=23)
    mask = torch.ones(V, dtype=torch.bool)
    uniforms = uniforms_for(B, 23)
    for threshold in (0.0, 1.0):
        params = edge_params(B, top_p=0.0, student_top_p=0.0, threshold=threshold)
        out = rsd_sample(teacher, student, uniforms, params, mask, mask, backend=backend, check_values=False)
        top = (teacher if threshold == 0.0 else student)[:, :V].argmax(-1)
        assert torch.equal(out.token, top) and out.accepted.tolist() == [threshold == 0.0] * B


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
def test_top_p_is_a_share_of_the_mass_top_k_kept(backend):
    """Top-k first, then top-p of what top-k kept (reference.py: the mass ranked before an id is compared with top_p
    times the mass top-k kept). Weights e^2, e, 1, 1 with top_k = 2 keep mass e^2 + e; id 0 alone holds 73% of it,
    so top_p = 0.7 keeps id 0 only, whatever the uniform. (Measured against the whole row, 61%, id 1 would stay.)"""
    use_backend(backend)
    B, V = 4, 4
    logits = torch.tensor([2.0, 1.0, 0.0, 0.0]).expand(B, V)
    mask = torch.ones(V, dtype=torch.bool)
    uniforms = torch.tensor([0.2, 0.7, 0.9, 1.0])[:, None].expand(B, NUM_DRAWS).contiguous()
    for threshold in (0.0, 1.0):  # the teacher's proposal, then the student's fallback
        params = edge_params(B, temperature=1.0, student_temperature=1.0, top_k=2, student_top_k=2, top_p=0.7,
                             student_top_p=0.7, threshold=threshold)
        out = rsd_sample(logits, logits, uniforms, params, mask, mask, backend=backend)
        assert out.token.tolist() == [0] * B and out.accepted.tolist() == [threshold == 0.0] * B
