import numpy as np
import pytest

from steerguard.errors import SteerguardError
from steerguard.export.sas import SASResult, sas_score


def test_sas_score_matches_hand_computed_pairs():
    # v1 = (1, 0), v2 = (1, 1), v3 = (0, 1): cos(v1,v2) = cos(v2,v3) = 1/sqrt(2), cos(v1,v3) = 0
    diffs = np.array([[1.0, 0.0], [2.0, 2.0], [0.0, 3.0]])
    assert sas_score(diffs) == pytest.approx((2 / np.sqrt(2) + 0) / 3)


def test_sas_score_equals_brute_force_mean_of_pairwise_cosines():
    rng = np.random.default_rng(0)
    diffs = rng.normal(size=(9, 5))
    u = diffs / np.linalg.norm(diffs, axis=1, keepdims=True)
    brute = np.mean([u[i] @ u[j] for i in range(9) for j in range(i + 1, 9)])
    assert sas_score(diffs) == pytest.approx(brute)


def test_best_layer_is_the_one_with_a_consistent_harm_direction():
    rng = np.random.default_rng(1)
    n, layers, d = 20, 6, 8
    benign = rng.normal(size=(n, layers + 1, d))
    harmful = benign + rng.normal(scale=1.0, size=benign.shape)   # random differences everywhere...
    harmful[:, 4] = benign[:, 4] + np.eye(d)[0] * 3 + rng.normal(scale=0.1, size=(n, d))  # ...but one layer
    res = SASResult.compute(harmful, benign)
    assert res.layers == list(range(1, layers))
    assert res.best_layer == 4
    assert max(res.scores) > 0.9


def test_sas_refuses_too_few_pairs():
    x = np.zeros((3, 5, 4))
    with pytest.raises(SteerguardError, match="at least"):
        SASResult.compute(x, x)


def test_sas_saves_json_and_png(tmp_path):
    rng = np.random.default_rng(2)
    res = SASResult.compute(rng.normal(size=(10, 5, 4)), rng.normal(size=(10, 5, 4)))
    res.save(tmp_path)
    assert SASResult.load(tmp_path) == res
    assert (tmp_path / "sas.png").read_bytes()[:4] == b"\x89PNG"
