"""The analytic RSD law of DESIGN.md §2 in float64 numpy, written independently of every backend.

numpy and torch only: the CUDA tests import this file on a bare GPU box where scipy is not installed
(bench/device_check.sh); tests/test_law.py checks the p-value against scipy's where scipy is."""
import numpy as np
import torch


def truncate(logits, temperature, top_k=0, top_p=1.0, mask=None):
    """Normalised truncated distribution of one row (float64)."""
    logits = np.asarray(logits, dtype=np.float64)
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    if temperature == 0:
        q = np.zeros_like(logits)
        q[int(np.argmax(logits))] = 1.0
        return q
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    kept = np.zeros(len(p), dtype=bool)
    if top_k > 0:
        kept[order[:top_k]] = True
    else:
        kept[:] = True
    total = p[kept].sum()
    before, first = 0.0, True
    for i in order:
        if not kept[i]:
            continue
        if top_p < 1 and before >= top_p * total and not first:  # at least one id
            kept[i] = False
        before, first = before + p[i], False
    q = np.where(kept, p, 0.0)
    return q / q.sum()


def softmax(logits, temperature=1.0):
    x = np.asarray(logits, dtype=np.float64)
    p = np.exp((x - x.max()) / temperature)
    return p / p.sum()


def rsd_law(teacher_logits, student_logits, *, temperature, top_k, top_p, threshold, check_temperature,
            student_temperature, student_top_k, student_top_p, trials, proposal_mask=None, fallback_mask=None):
    """(Q, accept rate) for one row: Q_K(y) = qT(y)·ok(y)·(1 + r + … + r^(K−1)) + r^K·qS(y)."""
    V = len(proposal_mask) if proposal_mask is not None else min(len(teacher_logits), len(student_logits))
    q_teacher = truncate(teacher_logits[:V], temperature, top_k, top_p, proposal_mask)
    ok = softmax(student_logits, check_temperature)[:V] >= threshold
    q_student = truncate(student_logits[:V], student_temperature, student_top_k, student_top_p, fallback_mask)
    r = float(q_teacher[~ok].sum())
    law = q_teacher * ok * sum(r**k for k in range(trials)) + r**trials * q_student
    return law, 1.0 - r**trials


def rsd_joint_law(teacher_logits, student_logits, *, trials, **kw):
    """[2, V] joint law of (accepted, token) for one row: row 1 = qT(y)·ok(y)·(1 + … + r^(K−1)) (a teacher
    proposal was kept), row 0 = r^K·qS(y) (the student wrote it); the rows sum to Q_K."""
    law, _ = rsd_law(teacher_logits, student_logits, trials=1, **{**kw, "threshold": 2.0})  # qS alone
    q_student = law
    full, accept_rate = rsd_law(teacher_logits, student_logits, trials=trials, **kw)
    r_k = 1.0 - accept_rate
    return np.stack([r_k * q_student, full - r_k * q_student])


def chi_square_pvalue(samples, law):
    """G-free plain chi-square of integer samples against a law, pooling cells expected below 5."""
    n = len(samples)
    observed = np.bincount(samples, minlength=len(law)).astype(np.float64)
    assert observed[law == 0].sum() == 0, f"sampled ids outside the law's support: {np.nonzero(observed * (law == 0))}"
    expected = law * n
    big = expected >= 5
    obs = list(observed[big]) + ([observed[~big].sum()] if (~big).any() and expected[~big].sum() > 0 else [])
    exp = list(expected[big]) + ([expected[~big].sum()] if (~big).any() and expected[~big].sum() > 0 else [])
    if len(obs) < 2:
        return 1.0
    obs, exp = np.asarray(obs), np.asarray(exp)
    return chi_square_sf(float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1)


def chi_square_sf(statistic: float, df: int) -> float:
    """P(X >= statistic) for X ~ chi-square(df): the regularised upper incomplete gamma Q(df/2, statistic/2)."""
    a, x = torch.tensor(df / 2, dtype=torch.float64), torch.tensor(statistic / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(a, x))


def accept_rate_matches(accepted, accept_rate, *, z=3.3) -> bool:
    """A binomial proportion within z standard deviations (z=3.3: two-sided alpha of about 1e-3)."""
    observed = float(np.mean(accepted))
    sd = np.sqrt(accept_rate * (1 - accept_rate) / len(accepted)) + 1e-12
    return abs(observed - accept_rate) < z * sd + 1e-9
