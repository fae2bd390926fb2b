"""evaluation/divergence.py against a numpy formula, and position_errors over a tiny model."""

import jax
import numpy as np

from tests import tiny_models
from tsld_jax.evaluation import divergence
from tsld_jax.models import decoder
from tsld_jax.quant import rules as rules_lib


def _numpy_kl(p_logits, q_logits):
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(p_logits.astype(np.float64)), log_softmax(q_logits.astype(np.float64))
    return (np.exp(lp) * (lp - lq)).sum(-1)


def test_kl_and_agreement_match_numpy():
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    student = teacher + rng.normal(size=teacher.shape).astype(np.float32)
    kl, agree = divergence.kl_and_agreement(teacher, student)
    np.testing.assert_allclose(kl, _numpy_kl(teacher, student), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(agree, teacher.argmax(-1) == student.argmax(-1))
    same, all_agree = divergence.kl_and_agreement(teacher, teacher)
    np.testing.assert_allclose(same, 0.0, atol=1e-6)
    assert all_agree.min() == 1.0


def test_position_errors_average_over_blocks():
    spec = tiny_models.llama_spec()
    params = decoder.init_params(jax.random.key(0), spec, std=0.2)
    rules = rules_lib.preset_rules("twn")
    quantizer = rules_lib.make_quantizer(rules)
    blocks = np.asarray(jax.random.randint(jax.random.key(1), (5, 8), 0, spec.vocab_size))
    out = divergence.position_errors(
        params, spec, params, spec, blocks, batch_size=2, quantizer=quantizer, progress=False
    )
    student = np.asarray(decoder.forward(params, blocks, spec, quantizer=quantizer))
    teacher = np.asarray(decoder.forward(params, blocks, spec))
    np.testing.assert_allclose(out["kl"], _numpy_kl(teacher, student).mean(0), rtol=1e-4)
    np.testing.assert_allclose(
        out["agreement"], (teacher.argmax(-1) == student.argmax(-1)).mean(0), atol=1e-12
    )
    assert out["kl"].shape == (8,) and out["kl"].min() > 0  # ternary weights differ from float
