"""SamplingParams refuses every out-of-range field with a message naming the field and the range."""
import math

import pytest

from rsd_engine import SamplingParams

BAD = [
    ("max_new_tokens", 0, "integer >= 1"),
    ("max_new_tokens", 2.5, "integer >= 1"),
    ("temperature", -0.1, "0 (argmax) or in [1e-30, 1e+30]"),
    ("temperature", math.nan, "0 (argmax) or in [1e-30, 1e+30]"),
    # 1/t overflows float32 below 2.9e-39: every backend turned finite rows into NaN weights
    ("temperature", 1e-40, "0 (argmax) or in [1e-30, 1e+30]"),
    ("temperature", 1e39, "0 (argmax) or in [1e-30, 1e+30]"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.5, "(0, 1]"),
    ("top_k", -1, ">= 0"),
    ("threshold", 1.01, "[0, 1]"),
    ("threshold", -0.5, "[0, 1]"),
    ("check_temperature", 0.0, "in [1e-30, 1e+30]"),
    ("check_temperature", 1e-38, "in [1e-30, 1e+30]"),
    ("student_temperature", math.inf, "0 (argmax) or in [1e-30, 1e+30]"),
    ("student_temperature", 2e-39, "0 (argmax) or in [1e-30, 1e+30]"),
    ("student_top_p", 0.0, "(0, 1]"),
    ("student_top_k", True, ">= 0"),
    ("proposal_trials", 0, "[1, 16]"),
    ("proposal_trials", 17, "[1, 16]"),
    ("seed", -1, "integer"),
    ("seed", 2**63, "integer in [0, 9223372036854775807]"),  # seeds travel as int64
    ("stop", [""], "non-empty"),
    ("stop", [3], "str"),
    ("stop_token_ids", [-2], ">= 0"),
    ("stop_token_ids", [7, -1], ">= 0"),  # -1 is no token id (it is a flag, sampling.TEACHER_NONFINITE)
    ("ignore_eos", 1, "True or False"),
]


@pytest.mark.parametrize("field,value,allowed", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_out_of_range_field_is_named(field, value, allowed):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    assert field in str(err.value) and allowed in str(err.value)


def test_the_edges_of_every_range_are_accepted():
    """Each range's own edges are legal values (params.RANGES says so in words): temperature 0 (argmax) and the
    extreme temperatures, top_p 1 and the smallest top_p, top_k 0 (off), threshold 0 and 1, 1 and 16 trials, seeds 0
    and 2**63 - 1, one new token."""
    edges = [dict(temperature=0.0, student_temperature=0.0, top_p=1.0, student_top_p=1.0, threshold=0.0, top_k=0,
                  student_top_k=0, proposal_trials=1, check_temperature=1e-30, seed=0, max_new_tokens=1),
             dict(temperature=1e-30, student_temperature=1e30, top_p=1e-30, student_top_p=1e-30, threshold=1.0,
                  top_k=1, student_top_k=10**12, proposal_trials=16, check_temperature=1e30, seed=2**63 - 1),
             dict(temperature=1e30, student_temperature=1e-30, top_k=10**12, student_top_k=1, stop_token_ids=[0])]
    for fields in edges:
        p = SamplingParams(**fields)
        assert all(getattr(p, k) == (tuple(v) if isinstance(v, list) else v) for k, v in fields.items())


def test_defaults_are_the_papers():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.threshold, p.student_temperature, p.student_top_p) == (0.7, 0.95, 0.01, 0.7, 0.95)
    assert (p.check_temperature, p.proposal_trials, p.top_k, p.max_new_tokens) == (1.0, 1, 0, 1024)


def test_sequences_become_tuples():
    p = SamplingParams(stop=["\n\n", "END"], stop_token_ids=[5], seed=3)
    assert p.stop == ("\n\n", "END") and p.stop_token_ids == (5,) and hash(p)
    assert SamplingParams(stop="END").stop == ("END",)


def test_numpy_numbers_are_numbers():
    """np.int64(5) was refused as top_k ("must be an integer >= 0") while np.float64 was taken: any
    numbers.Integral is an integer, any numbers.Real a number, stored as Python's own; a bool is neither."""
    np = pytest.importorskip("numpy")
    p = SamplingParams(top_k=np.int64(5), student_top_k=np.int32(3), proposal_trials=np.uint8(2),
                       max_new_tokens=np.int64(64), seed=np.int64(7), temperature=np.float32(0.5),
                       top_p=np.float64(0.9), threshold=np.float16(0.25), stop_token_ids=[np.int64(3)])
    assert (p.top_k, p.student_top_k, p.proposal_trials, p.max_new_tokens, p.seed) == (5, 3, 2, 64, 7)
    assert (p.temperature, p.top_p, p.threshold, p.stop_token_ids) == (0.5, 0.9, 0.25, (3,))
    for value in (p.top_k, p.student_top_k, p.proposal_trials, p.max_new_tokens, p.seed, *p.stop_token_ids):
        assert type(value) is int
    for value in (p.temperature, p.top_p, p.threshold):
        assert type(value) is float
    assert SamplingParams(stop_token_ids=np.int64(4)).stop_token_ids == (4,) and hash(p)
    assert SamplingParams(temperature=1).temperature == 1  # Python's numbers as given
    for field, value, allowed in [("top_k", np.int64(-1), ">= 0"), ("top_k", np.float64(5.0), "integer >= 0"),
                                  ("top_k", np.bool_(True), "integer >= 0"),
                                  ("temperature", np.bool_(True), "0 (argmax)"), ("temperature", True, "0 (argmax)"),
                                  ("max_new_tokens", np.float64(8), "integer >= 1"),
                                  ("proposal_trials", np.int64(17), "[1, 16]"), ("seed", np.int64(-1), "integer")]:
        with pytest.raises(ValueError) as err:
            SamplingParams(**{field: value})
        assert field in str(err.value) and allowed in str(err.value)
    with pytest.raises(ValueError, match="stop_token_ids must hold int values"):
        SamplingParams(stop_token_ids=[np.float64(3)])
