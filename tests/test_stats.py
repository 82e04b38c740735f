from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from ltc.errors import ConfigError
from ltc.stats import (
    MIN_PAIRS,
    PairedResult,
    compare_table,
    corrected_resampled_t,
    format_diff,
    kfold_test_train_ratio,
    paired_compare,
)

DIFFS = [0.10, 0.02, 0.05, -0.01, 0.07, 0.04, 0.03, 0.06, 0.00, 0.08]


def test_interval_matches_hand_computation():
    # 2 repeats x 5 folds -> J = 10 paired differences, K = 5 -> n_test/n_train = 1/4
    n = 10
    ratio = kfold_test_train_ratio(5)
    assert ratio == 0.25
    mean = sum(DIFFS) / n
    assert mean == pytest.approx(0.044, abs=1e-15)
    s2 = sum((d - mean) ** 2 for d in DIFFS) / (n - 1)  # ddof 1
    assert s2 == pytest.approx(0.01104 / 9, abs=1e-15)  # sum of squared deviations = 0.01104
    var = (1 / n + 1 / 4) * s2
    q = sps.t.ppf(0.975, 9)
    assert q == pytest.approx(2.262157, abs=1e-6)
    half = q * math.sqrt(var)
    p = 2 * sps.t.sf(mean / math.sqrt(var), 9)

    got_mean, low, high, p_value = corrected_resampled_t(DIFFS, test_train_ratio=ratio)
    assert got_mean == pytest.approx(mean, abs=1e-9)
    assert low == pytest.approx(mean - half, abs=1e-9)
    assert high == pytest.approx(mean + half, abs=1e-9)
    assert p_value == pytest.approx(p, abs=1e-9)
    assert low < 0.0 < high  # 8 of 10 positive, yet not significant once corrected: about [-0.003, +0.091]


def test_ratio_zero_is_scipy_paired_t_test():
    mean, low, high, p_value = corrected_resampled_t(DIFFS, test_train_ratio=0)
    ref = sps.ttest_1samp(DIFFS, 0.0)
    ci = ref.confidence_interval(0.95)
    assert mean == pytest.approx(np.mean(DIFFS), abs=1e-12)
    assert low == pytest.approx(ci.low, abs=1e-9)
    assert high == pytest.approx(ci.high, abs=1e-9)
    assert p_value == pytest.approx(ref.pvalue, abs=1e-9)


def test_correction_widens_interval():
    _, low0, high0, p0 = corrected_resampled_t(DIFFS, test_train_ratio=0)
    _, low, high, p = corrected_resampled_t(DIFFS, test_train_ratio=0.25)
    assert low < low0 and high > high0
    # width grows by sqrt((1/J + ratio) / (1/J))
    assert (high - low) / (high0 - low0) == pytest.approx(math.sqrt((0.1 + 0.25) / 0.1), rel=1e-12)
    assert p > p0
    assert low0 > 0 and p0 < 0.05  # the plain paired t-test would call it significant
    assert low < 0 and p > 0.05


def test_zero_variance():
    assert corrected_resampled_t([0.1, 0.1, 0.1], test_train_ratio=0.25) == (0.1, 0.1, 0.1, 0.0)
    assert corrected_resampled_t([0.0, 0.0, 0.0], test_train_ratio=0.25) == (0.0, 0.0, 0.0, 1.0)
    res = paired_compare([0.5, 0.5, 0.5], [0.5, 0.5, 0.5], higher_is_better=True, test_train_ratio=0.25)
    assert res.ties == 3 and res.significant is False and res.better is None


def test_counts_and_sign_higher_is_better():  # R²: a above b is a win
    a = [0.80, 0.70, 0.60, 0.50]
    b = [0.75, 0.72, 0.60, 0.40]
    res = paired_compare(a, b, higher_is_better=True, test_train_ratio=0.25)
    assert (res.n_pairs, res.wins, res.losses, res.ties) == (4, 2, 1, 1)
    assert res.mean_diff == pytest.approx((0.05 - 0.02 + 0.0 + 0.10) / 4)
    assert res.higher_is_better is True


def test_counts_and_sign_lower_is_better():  # MAE: a below b is a win; mean_diff stays a − b
    a = [0.10, 0.20, 0.30, 0.40, 0.50, 0.60]
    b = [0.20, 0.30, 0.40, 0.50, 0.60, 0.60]
    res = paired_compare(a, b, higher_is_better=False, test_train_ratio=0.25)
    assert (res.wins, res.losses, res.ties) == (5, 0, 1)
    assert res.mean_diff == pytest.approx(-0.5 / 6)
    assert res.significant is True and res.better == "a"
    assert res.verdict.startswith("better on 5 of 6, 1 tied; -0.083 [")
    assert res.verdict.endswith("], significant")
    swapped = paired_compare(b, a, higher_is_better=False, test_train_ratio=0.25)
    assert swapped.better == "b" and swapped.losses == 5
    assert swapped.verdict.startswith("worse on 5 of 6, 1 tied; +0.083 [")


def test_fewer_than_three_pairs_cannot_be_judged():
    assert MIN_PAIRS == 3
    res = paired_compare([0.9, 0.8], [0.1, 0.2], higher_is_better=True, test_train_ratio=0.25)
    assert res.n_pairs == 2 and res.wins == 2
    assert res.significant is None and res.ci_low is None and res.ci_high is None and res.p_value is None
    assert res.better is None
    assert res.verdict == "cannot be judged (2 pairs; need 3)"
    empty = paired_compare([], [], higher_is_better=True, test_train_ratio=0.25)
    assert empty.mean_diff is None and empty.verdict == "cannot be judged (0 pairs; need 3)"


def test_nan_pairs_dropped():
    nan = float("nan")
    a = [0.9, nan, 0.8, 0.7, 0.6, 0.5]
    b = [0.8, 0.5, nan, 0.6, 0.5, 0.4]
    res = paired_compare(a, b, higher_is_better=True, test_train_ratio=0.25)
    ref = paired_compare([0.9, 0.7, 0.6, 0.5], [0.8, 0.6, 0.5, 0.4], higher_is_better=True, test_train_ratio=0.25)
    assert res.n_pairs == 4 and res.n_dropped == 2
    assert (res.mean_diff, res.ci_low, res.ci_high, res.p_value) == (
        ref.mean_diff,
        ref.ci_low,
        ref.ci_high,
        ref.p_value,
    )
    few = paired_compare([0.9, nan, 0.8], [0.8, 0.5, nan], higher_is_better=True, test_train_ratio=0.25)
    assert few.verdict == "cannot be judged (1 pair; need 3)"


def test_clear_difference_significant_symmetric_noise_not():
    base = np.linspace(0.5, 0.9, 10)
    jitter = np.array([0.01, -0.01, 0.02, -0.02, 0.0, 0.01, -0.01, 0.02, -0.02, 0.0])
    clear = paired_compare(base + 0.1 + jitter, base, higher_is_better=True, test_train_ratio=0.25)
    assert clear.significant is True and clear.better == "a" and clear.p_value < 0.001
    assert clear.verdict == "better on 10 of 10; +0.100 [+0.080, +0.120], significant"

    noise = paired_compare(base + jitter, base, higher_is_better=True, test_train_ratio=0.25)
    assert noise.significant is False and noise.better is None
    assert noise.p_value == pytest.approx(1.0)
    assert noise.verdict == "no significant difference (better on 4 of 10, 2 tied; +0.000 [-0.020, +0.020])"


def test_compare_table_pairs_by_units():
    rows = []
    for repeat in range(2):
        for fold in range(3):
            score = 0.5 + 0.1 * fold + 0.01 * repeat
            rows.append({"repeat": repeat, "fold": fold, "setting": "scratch", "mae": score + 0.05 + 0.001 * fold})
            rows.append({"repeat": repeat, "fold": fold, "setting": "ft", "mae": score})
    rows.append({"repeat": 2, "fold": 0, "setting": "ft", "mae": 0.0})  # only one setting: ignored
    rows.append({"repeat": 2, "fold": 1, "setting": "scratch", "mae": 9.0})  # only one setting: ignored
    rows.append({"repeat": 2, "fold": 2, "setting": "ft", "mae": float("nan")})  # NaN: ignored
    rows.append({"repeat": 2, "fold": 2, "setting": "scratch", "mae": 0.3})
    rows.append({"repeat": 0, "fold": 0, "setting": "other", "mae": 100.0})  # a third setting: ignored
    df = pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # row order must not matter

    res = compare_table(
        df,
        unit_cols=["repeat", "fold"],
        setting_col="setting",
        metric_col="mae",
        a="ft",
        b="scratch",
        higher_is_better=False,
        test_train_ratio=kfold_test_train_ratio(3),
    )
    ordered = df[df.repeat < 2].sort_values(["repeat", "fold"])
    ref = paired_compare(
        ordered[ordered.setting == "ft"].mae.to_numpy(),
        ordered[ordered.setting == "scratch"].mae.to_numpy(),
        higher_is_better=False,
        test_train_ratio=0.5,
    )
    assert res.n_pairs == 6 and res.wins == 6 and res.n_dropped == 3
    assert res.mean_diff == pytest.approx(ref.mean_diff, abs=1e-12)
    assert res.ci_low == pytest.approx(ref.ci_low, abs=1e-12)
    assert res.better == "a"

    seeds = pd.DataFrame({"seed": [0, 0, 1, 1, 2, 2], "s": list("abbaab"), "r2": [0.8, 0.7, 0.7, 0.6, 0.9, 0.85]})
    one = compare_table(
        seeds,
        unit_cols="seed",
        setting_col="s",
        metric_col="r2",
        a="a",
        b="b",
        higher_is_better=True,
        test_train_ratio=0.2,
    )
    assert (one.n_pairs, one.wins, one.losses) == (3, 2, 1)
    assert one.mean_diff == pytest.approx((0.1 - 0.1 + 0.05) / 3)


def test_format_diff():
    assert format_diff(0.0314) == "+0.031"
    assert format_diff(-0.01) == "-0.010"
    assert format_diff(-0.0001) == "+0.000"
    assert format_diff(None) == "n/a"
    assert format_diff(1.23456, digits=2) == "+1.23"


def test_result_is_frozen():
    res = paired_compare([1, 2, 3], [0, 1, 2], higher_is_better=True, test_train_ratio=0.25)
    assert isinstance(res, PairedResult)
    with pytest.raises(AttributeError):
        res.n_pairs = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"diffs": [0.1, float("nan"), 0.2]}, r"diffs\[1\]=nan"),
        ({"diffs": [0.1, float("inf"), 0.2]}, r"diffs\[1\]=inf"),
        ({"diffs": [0.1]}, r"1 paired difference"),
        ({"test_train_ratio": -0.5}, r"test_train_ratio=-0.5"),
        ({"test_train_ratio": float("nan")}, r"test_train_ratio=nan"),
        ({"confidence": 1.5}, r"confidence=1.5"),
    ],
)
def test_corrected_t_bad_inputs(kwargs, match):
    args = {"diffs": DIFFS, "test_train_ratio": 0.25, **kwargs}
    with pytest.raises(ConfigError, match=match):
        corrected_resampled_t(args.pop("diffs"), **args)


def test_compare_bad_inputs():
    with pytest.raises(ConfigError, match="a has 3 values and b has 2"):
        paired_compare([1, 2, 3], [1, 2], higher_is_better=True, test_train_ratio=0.25)
    with pytest.raises(ConfigError, match=r"test_train_ratio=-1"):
        paired_compare([1, 2], [1, 2], higher_is_better=True, test_train_ratio=-1)
    with pytest.raises(ConfigError, match="b has value inf"):
        paired_compare([1, 2, 3], [1, float("inf"), 2], higher_is_better=True, test_train_ratio=0.25)
    with pytest.raises(ConfigError, match="n_folds=1"):
        kfold_test_train_ratio(1)

    df = pd.DataFrame({"seed": [0, 0, 0], "s": ["a", "b", "b"], "m": [1.0, 2.0, 3.0]})
    common = {"setting_col": "s", "metric_col": "m", "higher_is_better": True, "test_train_ratio": 0.2}
    with pytest.raises(ConfigError, match=r"\['run'\] not in the table"):
        compare_table(df, unit_cols="run", a="a", b="b", **common)
    with pytest.raises(ConfigError, match="b='c' is not a value of column 's'"):
        compare_table(df, unit_cols="seed", a="a", b="c", **common)
    with pytest.raises(ConfigError, match="same setting"):
        compare_table(df, unit_cols="seed", a="a", b="a", **common)
    with pytest.raises(ConfigError, match="two or more rows for unit"):
        compare_table(df, unit_cols="seed", a="a", b="b", **common)
