"""Ablation measurements: seed statistics, spike detection, n-gram reference losses."""

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from llmarch.errors import ConfigError
from llmarch.training.data import TokenData
from llmarch.training.ngram import HELD_OUT_FRACTION, LAMBDAS, ngram_reference
from llmarch.training.spikes import detect_grad_norm_outliers, detect_spikes
from llmarch.training.stats import T_975, paired_difference, summarize, t_critical

RUNS = Path(__file__).parent.parent / "docs" / "ablations" / "runs"


# ----------------------------------------------------------------------------------------
# stats
# ----------------------------------------------------------------------------------------


def test_summarize_by_hand():
    # [1, 2, 4]: mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9; / (n - 1) = 7/3
    s = summarize([1, 2, 4])
    assert s["n"] == 3 and s["mean"] == pytest.approx(7 / 3)
    assert s["std"] == pytest.approx(math.sqrt(7 / 3))
    half = 4.303 * math.sqrt(7 / 3) / math.sqrt(3)  # t(0.975, df=2) = 4.303
    assert s["ci95"][0] == pytest.approx(7 / 3 - half) and s["ci95"][1] == pytest.approx(7 / 3 + half)
    one = summarize([5.0])
    assert one == dict(n=1, mean=5.0, std=0.0, ci95=None)
    assert summarize([])["n"] == 0
    # beyond the table the normal quantile: 40 values 0..39, std by hand
    vals = list(range(40))
    std = math.sqrt(sum((v - 19.5) ** 2 for v in vals) / 39)
    assert summarize(vals)["ci95"][1] == pytest.approx(19.5 + 1.96 * std / math.sqrt(40))


def _t_cdf(t: float, df: int) -> float:
    """Student's t CDF by Simpson integration of its density from 0 (independent of the table)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    n = 20000
    h = t / n
    f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
    return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


@pytest.mark.parametrize("df", [1, 2, 3, 5, 10, 30])
def test_t_table_against_the_t_distribution(df):
    # the tabulated value rounds the 0.975 quantile to 3 decimals: the CDF there is 0.975 within the rounding
    t = T_975[df - 1]
    assert t_critical(df) == t
    lo, hi = _t_cdf(t - 0.0005, df), _t_cdf(t + 0.0005, df)
    assert lo <= 0.975 <= hi


def test_paired_difference_by_hand():
    base = [3.0, 3.2, 3.1]
    variant = [2.9, 3.0, 3.05]  # differences -0.1, -0.2, -0.05: mean -0.35/3
    d = paired_difference(variant, base)
    diffs = [-0.1, -0.2, -0.05]
    mean = sum(diffs) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2)
    half = 4.303 * std / math.sqrt(3)
    assert d["differences"] == pytest.approx(diffs) and d["mean"] == pytest.approx(mean)
    assert d["std"] == pytest.approx(std) and d["ci95"] == pytest.approx((mean - half, mean + half))
    assert d["significant"] == (mean + half < 0)  # by hand: -0.1167 + 0.1896 > 0, not significant
    assert d["significant"] is False
    # a consistent improvement on every seed is significant, an unpaired look would not say so
    d = paired_difference([3.0 - 0.1, 3.5 - 0.11, 2.5 - 0.09], [3.0, 3.5, 2.5])
    assert d["significant"] is True and d["ci95"][1] < 0
    one = paired_difference([1.0], [2.0])
    assert one["ci95"] is None and one["significant"] is False and one["mean"] == -1.0
    with pytest.raises(ConfigError, match="one variant value per baseline seed"):
        paired_difference([1.0, 2.0], [1.0])


# ----------------------------------------------------------------------------------------
# spikes
# ----------------------------------------------------------------------------------------


def _decreasing_noisy(n=200, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return list(3.0 + 5.0 * np.exp(-t / 40) + rng.normal(0, 0.05, n))


def test_one_spike_in_a_noisy_decreasing_curve():
    curve = _decreasing_noisy()
    curve[120] += 1.5
    assert detect_spikes(curve) == [120]
    assert detect_spikes(_decreasing_noisy(seed=1)) == []


def test_flat_and_smooth_curves_have_no_spikes():
    rng = np.random.default_rng(2)
    assert detect_spikes(list(4.0 + rng.normal(0, 0.02, 300))) == []
    assert detect_spikes([4.0] * 50 + [4.001, 3.999, 4.002]) == []  # flat history: the floor, not MAD 0
    assert detect_spikes([8.0 * math.exp(-i / 30) + 2.0 for i in range(300)]) == []


def test_non_finite_values_are_spikes():
    curve = _decreasing_noisy(60)
    curve[30] = math.nan
    curve[40] = math.inf
    assert detect_spikes(curve) == [30, 40]


def test_grad_norm_outliers_in_log_space():
    rng = np.random.default_rng(3)
    norms = list(np.exp(rng.normal(np.log(0.5), 0.1, 100)))
    norms[50] *= 50
    assert detect_grad_norm_outliers(norms) == [50]
    norms[70] *= 2  # a 2x wobble is within the log-space floor
    assert detect_grad_norm_outliers(norms) == [50]


def _rows(run: str) -> list[dict]:
    (path,) = (RUNS / run).glob("metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_real_runs_sandwich_spike_flagged_baseline_clean():
    rows = _rows("sandwich-norm-gemma-3")
    steps = [rows[i]["step"] for i in detect_spikes([r["loss"] for r in rows])]
    assert steps == [40]  # loss 7.26 among ~6.3
    grad = [rows[i]["step"] for i in detect_grad_norm_outliers([r["grad_norm"] for r in rows])]
    assert 40 in grad and len(grad) <= 3  # grad norm 23.5, ~50x the others
    base = _rows("gqa-4-1-pre-norm-llama-3-baseline")
    assert detect_spikes([r["loss"] for r in base]) == []
    assert len(detect_grad_norm_outliers([r["grad_norm"] for r in base])) <= 1


# ----------------------------------------------------------------------------------------
# n-gram references
# ----------------------------------------------------------------------------------------


def _reference_by_hand(train: list[int], pairs: list[tuple[int, int]], vocab: int) -> tuple[float, float, float]:
    """Pure-python add-one unigram and interpolated bigram, lambda picked on the last 5% of train."""

    def fit(tokens):
        uni = Counter(tokens)
        ctx = Counter(tokens[:-1])
        big = Counter(zip(tokens[:-1], tokens[1:]))

        def p_uni(b):
            return (uni[b] + 1) / (len(tokens) + vocab)

        def p_big(a, b, lam):
            if ctx[a] == 0:
                return p_uni(b)
            return lam * big[(a, b)] / ctx[a] + (1 - lam) * p_uni(b)

        return p_uni, p_big

    cut = len(train) - max(1, int(len(train) * HELD_OUT_FRACTION))
    _, p_big = fit(train[:cut])
    held = list(zip(train[cut - 1 : -1], train[cut:]))
    ce = {lam: -sum(math.log(p_big(a, b, lam)) for a, b in held) / len(held) for lam in LAMBDAS}
    lam = min(LAMBDAS, key=lambda x: (ce[x], LAMBDAS.index(x)))
    p_uni, p_big = fit(train)
    uni = -sum(math.log(p_uni(b)) for _, b in pairs) / len(pairs)
    big = -sum(math.log(p_big(a, b, lam)) for a, b in pairs) / len(pairs)
    return uni, big, lam


def _val_pairs(data: TokenData, seq_len: int, batch: int, n_batches: int) -> list[tuple[int, int]]:
    """(context, target) of every target loop.evaluate scores: from the model's own windows."""
    pairs = []
    for x, y in data.val_batches(batch, seq_len, n_batches):
        for xs, ys in zip(x.tolist(), y.tolist()):
            pairs += list(zip(xs, ys))  # the context of target t is input t (the previous token)
    return pairs


@pytest.mark.parametrize("max_windows", [None, 4])
def test_ngram_reference_by_hand(max_windows):
    rng = np.random.default_rng(0)
    vocab = 7  # token 6 never occurs in train: add-one and the unseen-context rule both matter
    # a stream with structure (a bigram helps): mostly i -> i + 1 mod 6, sometimes random
    train, t = [], 0
    for _ in range(400):
        t = (t + 1) % 6 if rng.random() < 0.7 else int(rng.integers(0, 6))
        train.append(t)
    val = [int(v) for v in rng.integers(0, 7, 53)]
    data = TokenData(np.array(train, dtype=np.uint16), np.array(val, dtype=np.uint16), vocab, Path("hand"))
    got = ngram_reference(data, seq_len=5, max_windows=max_windows)
    batch, n_batches = (2, 2) if max_windows else (1, 1000)
    pairs = _val_pairs(data, 5, batch, n_batches)
    uni, big, lam = _reference_by_hand(train, pairs, vocab)
    assert got["val_tokens"] == len(pairs) == (20 if max_windows else 50)
    assert got["bigram_lambda"] == lam
    assert got["unigram"] == pytest.approx(uni, rel=1e-12) and got["bigram"] == pytest.approx(big, rel=1e-12)


def test_ngram_bigram_beats_unigram_on_structured_text():
    rng = np.random.default_rng(1)
    seq = [0]
    for _ in range(5000):
        seq.append((seq[-1] + 1) % 50 if rng.random() < 0.9 else int(rng.integers(0, 50)))
    arr = np.array(seq, dtype=np.uint16)
    data = TokenData(arr[:4500], arr[4500:], 50, Path("s"))
    ref = ngram_reference(data, seq_len=16, max_windows=None)
    assert ref["bigram"] < 0.5 * ref["unigram"] and ref["unigram"] == pytest.approx(math.log(50), abs=0.05)
    assert ref["bigram_lambda"] >= 0.9
