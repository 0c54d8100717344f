"""The prober as the `pre` engine computes it: int8 weights that keep its decisions, and NaN on a
non-finite state so the guard fails closed."""
import numpy as np
import onnxruntime as ort

from steerguard.export.onnx_graph import ProberWeights, decoder_engine, dequantized_prober_w1, save_engine
from steerguard.engines import session_options
from steerguard.export.arch import DecoderSpec


def test_int8_prober_weights_survive_folded_standardisation():
    rng = np.random.default_rng(0)
    # folded standardisation gives input rows whose scales differ by orders of magnitude
    w1 = (rng.normal(size=(64, 16)) * np.logspace(-3, 2, 64)[:, None]).astype(np.float32)
    x = rng.normal(size=(500, 64)).astype(np.float32) / np.logspace(-3, 2, 64)
    exact, approx = x @ w1, x @ dequantized_prober_w1(w1)
    assert np.abs(exact - approx).max() <= 0.02 * np.abs(exact).max()


def test_pre_engine_risk_is_nan_when_the_state_is_not_finite(tiny_export, tmp_path):
    spec = DecoderSpec.from_model(tiny_export.lm.model, context=32)
    p = tiny_export.guard.prober
    path = tmp_path / "pre.onnx"
    save_engine(decoder_engine(spec, 0, 1, final_norm=False, prober=ProberWeights(p.w1, p.b1, p.w2, p.b2)), path)
    sess = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    empty = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
    x = np.random.default_rng(0).normal(size=(1, 3, spec.hidden_size)).astype(np.float32)
    feeds = {"seqlens_k": np.array([2], np.int32), "total_sequence_length": np.array(3, np.int32),
             "past_key_values.0.key": empty,
             "past_key_values.0.value": empty}
    [ok] = sess.run(["risk"], {**feeds, "inputs_embeds": x})
    x[0, 2, 5] = np.nan
    [bad] = sess.run(["risk"], {**feeds, "inputs_embeds": x})
    assert np.isfinite(ok).all() and np.isnan(bad).all()
