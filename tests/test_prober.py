import numpy as np
import pytest

from steerguard.errors import SteerguardError
from steerguard.export.calibrate import operating_points, roc_table, source_balanced_weights
from steerguard.export.operating import tau_at_fpr
from steerguard.export.prober import Prober, auroc


def synthetic(n=200, d=16, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, d)) * 3 + 10          # off-centre and scaled: standardisation matters
    x[:, 0] += np.where(y == 1, 5.0, -5.0)
    return x.astype(np.float32), y


def test_prober_learns_a_separable_direction_and_is_deterministic():
    x, y = synthetic()
    a = Prober.train(x[:150], y[:150], layer=3, seed=1)
    b = Prober.train(x[:150], y[:150], layer=3, seed=1)
    np.testing.assert_array_equal(a.w1, b.w1)
    assert auroc(a.risk(x[150:]), y[150:]) > 0.95
    assert a.w1.shape == (16, 64) and a.w2.shape == (64, 2)


def test_folded_standardisation_equals_explicit(tmp_path):
    x, y = synthetic()
    p = Prober.train(x, y, layer=2)
    p.save(tmp_path)
    q = Prober.load(tmp_path)
    np.testing.assert_allclose(p.risk(x), q.risk(x), rtol=1e-6)


def test_non_finite_features_fire_the_guard():
    x, y = synthetic()
    p = Prober.train(x, y, layer=2)
    bad = x[:2].copy()
    bad[0, 3] = np.nan
    bad[1, 5] = np.inf
    assert p.fires(bad).all()


def test_prober_needs_both_classes():
    x, _ = synthetic()
    with pytest.raises(SteerguardError, match="both"):
        Prober.train(x, np.ones(len(x), int), layer=1)


def test_tau_keeps_every_benign_source_mean_false_fires_under_the_budget():
    rng = np.random.default_rng(0)
    risk = np.concatenate([rng.uniform(0, 0.7, 100), rng.uniform(0, 0.9, 20), rng.uniform(0.6, 1, 100)])
    labels = np.array([0] * 120 + [1] * 100)
    sources = np.array(["big"] * 100 + ["small"] * 20 + ["harm"] * 100)
    tau = tau_at_fpr(risk, labels, sources, 0.02)
    rates = [(risk[sources == s] >= tau).mean() for s in ("big", "small")]
    assert np.mean(rates) <= 0.02
    assert tau == min(t for t in np.unique(risk) if np.mean([(risk[sources == s] >= t).mean() for s in ("big", "small")]) <= 0.02)
    # pooled, the small source's false fires would hide in the big one's rows
    assert tau_at_fpr(risk, labels, np.where(labels == 0, "one", "harm"), 0.02) < tau


def test_operating_points_order_and_report_what_they_give():
    rng = np.random.default_rng(1)
    risk = np.concatenate([rng.uniform(0, 0.8, 300), rng.uniform(0.4, 1, 300)])
    labels = np.array([0] * 300 + [1] * 300)
    sources = np.array(["b"] * 300 + ["h"] * 300)
    points = operating_points(risk, labels, sources, {"strict": 0.1, "balanced": 0.02, "permissive": 0.0})
    assert points["strict"]["tau"] <= points["balanced"]["tau"] <= points["permissive"]["tau"]
    assert points["strict"]["tpr"] >= points["balanced"]["tpr"] >= points["permissive"]["tpr"]
    for p in points.values():
        assert p["fpr"] <= p["target_fpr"] and p["fire_rates"]["validation:b"] == p["fpr"]
    assert points["permissive"]["fpr"] == 0
    roc = roc_table(risk, labels)
    assert roc["fpr"][0] == 0 and roc["tpr"][-1] == 1 and 0.8 < roc["auroc"] < 1 and roc["rows"] == 600


def test_source_balanced_weights():
    labels = np.array([1, 1, 1, 0, 0, 0])
    sources = np.array(["a", "a", "b", "c", "c", "c"])
    w = source_balanced_weights(labels, sources)
    assert w[labels == 1].sum() == pytest.approx(1) and w[labels == 0].sum() == pytest.approx(1)
    assert w[0] + w[1] == pytest.approx(w[2])      # source a as heavy as source b


def test_a_logistic_probe_is_stored_exactly_as_two_relu_units(tmp_path):
    from sklearn.linear_model import LogisticRegression

    from steerguard.export.onnx_graph import dequantized_prober_w1

    x, y = synthetic()
    p = Prober.train_linear(x, y, layer=3, c=0.05)
    assert p.probe == "linear" and p.w1.shape == (16, 2) and p.feature == "last"
    x64 = x.astype(np.float64)
    mu, sd = x64.mean(0), x64.std(0) + 1e-6
    lr = LogisticRegression(C=0.05, max_iter=1000, tol=1e-5).fit((x - mu) / sd, y)
    np.testing.assert_allclose(p.risk(x), lr.predict_proba((x64 - mu) / sd)[:, 1], atol=1e-5)
    np.testing.assert_array_equal(dequantized_prober_w1(p.w1), p.w1)   # int8 in the engine: no loss
    p.save(tmp_path)
    assert Prober.load(tmp_path).probe == "linear"
    assert Prober.train(x, y, layer=3).probe == "mlp"


def test_a_token_feature_logistic_probe_reads_the_riskiest_token():
    rng = np.random.default_rng(2)
    prompts = [rng.normal(size=(int(rng.integers(3, 8)), 8)).astype(np.float32) for _ in range(120)]
    y = np.array([i % 2 for i in range(120)])
    for t, label in zip(prompts, y):
        if label:
            t[rng.integers(len(t)), 0] += 6.0       # one risky word somewhere in a harmful prompt
    arr = np.empty(len(prompts), object)
    arr[:] = prompts
    p = Prober.train_linear(arr, y, layer=1, feature="max")
    assert auroc(p.prompt_risk(arr), y) > 0.95


def test_a_prober_confined_to_the_pair_subspace_ignores_style():
    """Pairs differ along intent (coordinate 0); a style offset (coordinate 1) separates the training
    sources but is the same inside every pair. The confined prober keeps the same exported shape and
    does not move when the style changes; an unconstrained one, trained where style and label correlate, does."""
    from steerguard.export.prober import pair_subspace

    rng = np.random.default_rng(0)
    d, n = 16, 300
    style = rng.integers(0, 2, n).astype(float)
    base = rng.normal(size=(n, d))
    base[:, 1] = 6 * style
    harmful, benign = base.copy(), base.copy()
    harmful[:, 0] += 2.0 + rng.normal(scale=0.5, size=n)    # intent varies a little, in a few directions
    benign[:, 0] -= 2.0
    harmful[:, 2:4] += rng.normal(scale=0.5, size=(n, 2))
    # a training set where style and label correlate: harmful rows mostly in style 1
    x = np.concatenate([harmful[style == 1], benign[style == 0]]).astype(np.float32)
    y = np.concatenate([np.ones((style == 1).sum()), np.zeros((style == 0).sum())]).astype(int)
    basis = pair_subspace(harmful, benign, k=2)
    assert basis.shape == (3, d) and np.allclose(basis @ basis.T, np.eye(3), atol=1e-8)
    assert np.abs(basis[:, 1]).max() < 1e-8    # nothing of the style coordinate
    confined = Prober.train(x, y, layer=1, subspace=basis, seed=0)
    free = Prober.train(x, y, layer=1, seed=0)
    assert confined.w1.shape == free.w1.shape == (d, 64)
    flipped = harmful.copy()
    flipped[:, 1] = 6 * (1 - style)          # the same requests in the other style
    assert np.abs(confined.risk(flipped) - confined.risk(harmful)).max() < 0.05
    assert np.abs(free.risk(flipped) - free.risk(harmful)).max() > 0.2


def test_source_erasure_removes_the_style_that_tells_sources_apart():
    """Two harmful and two benign sources; a style coordinate separates the sources inside each class
    and, as it happens, leans harmful. The prober trained after erasure keeps the intent direction and
    ignores the style; one trained without it moves with the style."""
    from steerguard.export.prober import source_erasure

    rng = np.random.default_rng(1)
    d, n = 12, 100
    rows, labels, sources = [], [], []
    for name, label, style in [("h1", 1, 4.0), ("h2", 1, 1.0), ("b1", 0, -1.0), ("b2", 0, 0.5)]:
        x = rng.normal(size=(n, d))
        x[:, 0] += 2.0 if label else -2.0       # intent
        x[:, 1] = style + rng.normal(scale=0.3, size=n)
        rows.append(x)
        labels += [label] * n
        sources += [name] * n
    x, y, src = np.concatenate(rows), np.array(labels), np.array(sources)
    erase = source_erasure(x, y, src, k=1)
    assert erase.shape == (d, d)
    assert np.linalg.matrix_rank(erase) == d - 1          # one direction gone
    erased = Prober.train(x, y, layer=1, erase=erase, seed=0)
    free = Prober.train(x, y, layer=1, seed=0)
    assert erased.w1.shape == free.w1.shape == (d, 64)
    assert auroc(erased.risk(x), y) > 0.95
    probe = x[y == 1].copy()
    shifted = probe.copy()
    shifted[:, 1] -= 4.0                       # the same harmful requests in a style only benign sources had
    assert np.abs(erased.risk(shifted) - erased.risk(probe)).mean() < 0.05
    assert np.abs(free.risk(shifted) - free.risk(probe)).mean() > 0.1
    assert np.allclose(source_erasure(x, y, src, k=0), np.diag(1 / (x.std(0) + 1e-6)))


def prompts_with_one_risky_token(n: int, harmful: bool, rng, d: int = 16) -> list[np.ndarray]:
    """Token states of n prompts (3-11 tokens); a harmful prompt has one token somewhere that carries
    the harm, and its last token looks like any other."""
    out = []
    for _ in range(n):
        t = rng.normal(size=(rng.integers(3, 12), d)).astype(np.float32) * 2 + 5
        if harmful:
            t[rng.integers(len(t) - 1), 0] += 8.0
        out.append(t)
    return out


def test_a_max_prober_finds_the_one_risky_token_the_last_token_prober_cannot_see():
    rng = np.random.default_rng(0)
    train = prompts_with_one_risky_token(300, True, rng) + prompts_with_one_risky_token(300, False, rng)
    test = prompts_with_one_risky_token(200, True, rng) + prompts_with_one_risky_token(200, False, rng)
    y, y_test = np.repeat([1, 0], 300), np.repeat([1, 0], 200)
    per_token = Prober.train(train, y, layer=3, feature="max", seed=1)
    again = Prober.train(train, y, layer=3, feature="max", seed=1)
    np.testing.assert_array_equal(per_token.w1, again.w1)
    last = Prober.train(np.stack([t[-1] for t in train]), y, layer=3, feature="last", seed=1)
    assert auroc(per_token.prompt_risk(test), y_test) > 0.9
    assert auroc(last.risk(np.stack([t[-1] for t in test])), y_test) < 0.65
    # a prompt's risk is its riskiest token's, and a non-finite token fires the guard
    risks = per_token.prompt_risk(test[:3])
    assert np.allclose(risks, [per_token.risk(t).max() for t in test[:3]])
    broken = [t.copy() for t in test[200:203]]
    broken[1][0, 4] = np.nan
    assert per_token.fires(broken)[1] and np.isnan(per_token.prompt_risk(broken)[1])
