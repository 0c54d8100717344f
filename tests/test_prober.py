import numpy as np
import pytest

from steerguard.errors import SteerguardError
from steerguard.export.calibrate import calibrate_tau, source_balanced_weights
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


def test_tau_keeps_validation_false_fires_under_the_budget():
    rng = np.random.default_rng(0)
    risk = np.concatenate([rng.uniform(0, 0.7, 100), rng.uniform(0.6, 1, 100)])
    labels = np.array([0] * 100 + [1] * 100)
    tau = calibrate_tau(risk, labels, max_fpr=0.02)
    assert (risk[labels == 0] >= tau).mean() <= 0.02
    assert 0.2 <= tau <= 0.8


def test_source_balanced_weights():
    labels = np.array([1, 1, 1, 0, 0, 0])
    sources = np.array(["a", "a", "b", "c", "c", "c"])
    w = source_balanced_weights(labels, sources)
    assert w[labels == 1].sum() == pytest.approx(1) and w[labels == 0].sum() == pytest.approx(1)
    assert w[0] + w[1] == pytest.approx(w[2])      # source a as heavy as source b


def test_default_tau_separates_best_on_validation():
    risk = np.array([0.05, 0.1, 0.3, 0.35, 0.62, 0.7, 0.9, 0.95])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    tau = calibrate_tau(risk, labels)
    assert 0.35 < tau <= 0.62
    assert (risk >= tau).tolist() == labels.astype(bool).tolist()
