"""tests/law.py's chi-square p-value (torch's incomplete gamma, no scipy: the GPU box has none) against
scipy's, where scipy is installed (the test extra)."""
import numpy as np
import pytest

from law import chi_square_pvalue, chi_square_sf

stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("df", [1, 2, 3, 7, 50, 999])
@pytest.mark.parametrize("quantile", [1e-9, 1e-3, 0.05, 0.5, 0.95, 0.999999])
def test_chi_square_sf_matches_scipy(df, quantile):
    statistic = stats.chi2.ppf(quantile, df)
    assert chi_square_sf(statistic, df) == pytest.approx(stats.chi2.sf(statistic, df), rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("seed", range(5))
def test_chi_square_pvalue_matches_scipy_chisquare(seed):
    """The same pooling as before (cells expected below 5 in one), only the p-value computed without scipy."""
    rng = np.random.default_rng(seed)
    law = rng.dirichlet(np.full(40, 0.3))
    samples = rng.choice(40, size=2000, p=law if seed % 2 else np.roll(law, 1))  # odd seeds: the right law
    expected = law * len(samples)
    observed = np.bincount(samples, minlength=40).astype(np.float64)
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    assert chi_square_pvalue(samples, law) == pytest.approx(stats.chisquare(obs, exp).pvalue, rel=1e-8, abs=1e-300)


def test_a_single_cell_is_no_evidence():
    assert chi_square_pvalue(np.zeros(10, dtype=np.int64), np.array([1.0, 0.0])) == 1.0
