"""The reference RSD sampler's fixed points, and the uniforms of DESIGN.md §3. (Its law is tested with
every backend's in test_rsd_sample.py.)"""
import numpy as np
import pytest
import torch

from rsd_engine.randomness import NUM_DRAWS, step_uniforms
from rsd_engine.sampling import RowParams, rsd_sample_reference

ALPHA = 1e-3


def row_params(n, **kw):
    base = dict(temperature=0.7, top_k=0, top_p=0.95, threshold=0.01, check_temperature=1.0,
                student_temperature=0.7, student_top_k=0, student_top_p=0.95, proposal_trials=1)
    base.update(kw)
    ints = {"top_k", "student_top_k", "proposal_trials"}
    return RowParams(**{k: torch.full((n,), v, dtype=torch.int32 if k in ints else torch.float32)
                        for k, v in base.items()})


def test_thresholds_zero_and_one_pick_teacher_and_student():
    gen = torch.Generator().manual_seed(1)
    teacher, student = torch.randn(4, 50, generator=gen), torch.randn(4, 50, generator=gen)
    mask = torch.ones(50, dtype=torch.bool)
    u = step_uniforms(torch.arange(4), torch.zeros(4, dtype=torch.long))
    greedy = dict(temperature=0.0, student_temperature=0.0)
    out0 = rsd_sample_reference(teacher, student, u, row_params(4, threshold=0.0, **greedy), mask, mask)
    out1 = rsd_sample_reference(teacher, student, u, row_params(4, threshold=1.0, **greedy), mask, mask)
    assert torch.equal(out0.token, teacher.argmax(-1)) and out0.accepted.all()
    assert torch.equal(out1.token, student.argmax(-1)) and not out1.accepted.any()
    assert torch.allclose(out1.student_logprob, torch.log_softmax(student, -1).max(-1).values)
    assert torch.allclose(out0.teacher_logprob, torch.log_softmax(teacher, -1).max(-1).values)


def test_nonfinite_rows_are_flagged_not_sampled():
    teacher, student = torch.randn(3, 10), torch.randn(3, 10)
    teacher[0, 4] = float("nan")
    student[1, 2] = float("inf")
    teacher[2, 0] = float("-inf")  # -inf is a legal mask value
    mask = torch.ones(10, dtype=torch.bool)
    out = rsd_sample_reference(teacher, student, step_uniforms(torch.arange(3), torch.zeros(3)), row_params(3),
                               mask, mask)
    assert out.token.tolist()[:2] == [-1, -2] and out.token[2] >= 1
    assert out.accepted.tolist()[:2] == [False, False]
    assert out.teacher_logprob[:2].isnan().all() and out.student_logprob[:2].isnan().all()


def test_uniforms_depend_only_on_seed_step_draw():
    seeds = torch.tensor([5, 2**62 + 3, 0, 123456789])
    steps = torch.tensor([0, 7, 1, 2**33])
    u = step_uniforms(seeds, steps)
    assert u.shape == (4, NUM_DRAWS) and u.dtype == torch.float32
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.equal(step_uniforms(seeds[perm], steps[perm]), u[perm])
    assert torch.equal(step_uniforms(seeds[1:2], steps[1:2]), u[1:2])
    assert ((u > 0) & (u <= 1)).all()
    assert len(set(u.flatten().tolist())) == u.numel()


def test_uniforms_are_uniform():
    from scipy import stats

    n = 50_000
    u = step_uniforms(torch.arange(n) * 7919, torch.arange(n) % 13)
    for column in (0, 1, 5):
        assert stats.kstest(u[:, column].numpy(), "uniform").pvalue > ALPHA
    # Neighbouring steps of one seed are uncorrelated.
    v = step_uniforms(torch.zeros(n, dtype=torch.long), torch.arange(n))[:, 1].numpy()
    assert abs(np.corrcoef(v[:-1], v[1:])[0, 1]) < 0.03


def test_a_value_out_of_range_only_as_the_ops_read_it_says_so():
    # top_p 1e-46 is in (0, 1] as a float64, and 0 as the float32 the kernels read: "1e-46 is out of range" alone
    # contradicted itself.
    from rsd_engine.sampling import sample_tokens

    with pytest.raises(ValueError, match=r"^top_p\[1\] = 1e-46 \(0 in float32, as the ops read it\) is out of range"):
        sample_tokens(torch.randn(2, 8), torch.rand(2), torch.ones(2), torch.zeros(2, dtype=torch.int32),
                      torch.tensor([0.9, 1e-46], dtype=torch.float64), torch.ones(8, dtype=torch.bool), "reference")
