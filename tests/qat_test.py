"""A jitted QAT step on a tiny random model: the TSLD loss falls, the teacher never moves."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tsld_jax import losses, qat
from tsld_jax.models import decoder
from tsld_jax.models.spec import ModelSpec
from tsld_jax.quant import rules

STEPS = 20


def tiny_spec():
    return ModelSpec(
        family="llama", vocab_size=16, hidden_size=16, num_layers=2, num_heads=2,
        num_kv_heads=1, head_dim=8, mlp_size=24, norm="rmsnorm", activation="silu",
        gated_mlp=True, positional="rotary", attn_bias=False, attn_out_bias=False,
        mlp_bias=False, tie_embeddings=False,
    )  # fmt: skip


def _setup(seed=0):
    spec = tiny_spec()
    # A wider init than decoder's default gives the teacher confident, token-dependent logits.
    teacher = jax.tree.map(lambda x: 5.0 * x, decoder.init_params(jax.random.key(seed), spec))
    tokens = jax.random.randint(jax.random.key(seed + 1), (4, 10), 0, spec.vocab_size)
    loss_mask = jnp.ones(tokens.shape, jnp.int32).at[:, 0].set(0)
    attention_mask = jnp.ones(tokens.shape, jnp.int32).at[3, 7:].set(0)  # one padded sequence
    batch = {"tokens": tokens, "attention_mask": attention_mask, "loss_mask": loss_mask}
    return spec, teacher, batch


def _train(spec, student, teacher, batch, rule_set, kind="tsld", lr=3e-3):
    optimizer = optax.adamw(lr)  # the optimizer state covers the student only

    @jax.jit
    def step(student, opt_state, teacher, batch):
        (loss, parts), grads = jax.value_and_grad(qat.qat_loss, has_aux=True)(
            student, teacher, batch, spec, rule_set, kind
        )
        updates, opt_state = optimizer.update(grads, opt_state, student)
        return optax.apply_updates(student, updates), opt_state, loss, parts

    opt_state = optimizer.init(student)
    history = []
    for _ in range(STEPS):
        student, opt_state, loss, parts = step(student, opt_state, teacher, batch)
        history.append(float(loss))
    return student, history


@pytest.mark.parametrize("preset", ["twn", "pact2"])
def test_qat_lowers_the_tsld_loss_and_leaves_the_teacher_alone(preset):
    spec, teacher, batch = _setup()
    rule_set = rules.preset_rules(preset)
    student = rules.add_learned_scales(teacher, rule_set)  # the student starts from the teacher
    teacher_before = jax.tree.map(np.array, teacher)

    trained, history = _train(spec, student, teacher, batch, rule_set)

    assert all(np.isfinite(history)), history
    assert history[-1] < 0.8 * history[0], history
    jax.tree.map(np.testing.assert_array_equal, teacher_before, jax.tree.map(np.asarray, teacher))
    kernel = trained["layers"]["mlp"]["up"]["kernel"]
    assert not np.allclose(np.asarray(kernel), teacher_before["layers"]["mlp"]["up"]["kernel"])
    if preset == "pact2":
        gamma = np.asarray(trained["layers"]["attn"]["q"]["quant_scale"])
        assert np.abs(gamma - 1.0).max() > 1e-4, "PACT+ scales should be learned"


@pytest.mark.parametrize("kind", ["tsld", "l2l"])
def test_teacher_gets_no_gradient(kind):
    spec, teacher, batch = _setup()
    student = jax.tree.map(lambda x: x + 0.01, teacher)
    grad_fn = jax.jit(jax.grad(qat.qat_loss, argnums=1, has_aux=True), static_argnums=(3, 4, 5))
    teacher_grads, _ = grad_fn(student, teacher, batch, spec, rules.preset_rules("twn"), kind)
    for grad in jax.tree.leaves(teacher_grads):
        np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_every_kind_matches_a_manual_composition():
    spec, teacher, batch = _setup()
    student = jax.tree.map(lambda x: x + 0.01, teacher)
    rule_set = rules.preset_rules("twn")

    @jax.jit
    def both(student, teacher, batch):
        # The same losses, composed by hand from PTQ weights and a teacher forward: on tokens
        # 0..T-2, and for l2l on all T tokens (its hidden states and attention cover the whole
        # block, its logits the first T - 1 positions).
        tokens, attention = batch["tokens"], batch["attention_mask"]
        mask = (batch["loss_mask"] * attention)[:, 1:]
        ptq = rules.quantize_params(student, rule_set)
        s_logits = decoder.forward(ptq, tokens[:, :-1], spec, mask_BxT=attention[:, :-1])
        t_logits = decoder.forward(teacher, tokens[:, :-1], spec, mask_BxT=attention[:, :-1])
        collect = ("hidden", "attn_probs")
        s_all, s_aux = decoder.forward(ptq, tokens, spec, mask_BxT=attention, collect=collect)
        t_all, t_aux = decoder.forward(teacher, tokens, spec, mask_BxT=attention, collect=collect)
        out = {}
        for kind in losses.KINDS:
            if kind != "l2l":
                expected = losses.distillation_loss(kind, s_logits, t_logits, tokens[:, 1:], mask)[
                    0
                ]
            else:
                expected = losses.l2l(
                    s_all[:, :-1],
                    t_all[:, :-1],
                    s_aux["hidden"],
                    t_aux["hidden"],
                    s_aux["attn_probs"],
                    t_aux["attn_probs"],
                    mask,
                    aux_mask=attention,
                )
            out[kind] = (qat.qat_loss(student, teacher, batch, spec, rule_set, kind)[0], expected)
        return out

    for kind, (got, expected) in both(student, teacher, batch).items():
        np.testing.assert_allclose(float(got), float(expected), rtol=1e-5, err_msg=kind)


def test_segment_ids_reach_student_and_teacher():
    """data.document_attention's segment ids: the ground-truth loss is the cross-entropy of each
    document's logits run alone (the first token of the second document predicted from the
    first's last position), and the logit loss of a student equal to its teacher is the entropy
    of those per-document distributions (both models read the same mask)."""
    spec, teacher, _ = _setup()
    tokens = jax.random.randint(jax.random.key(7), (2, 10), 0, spec.vocab_size)
    ones = jnp.ones(tokens.shape, jnp.int32)
    segments = jnp.asarray(np.repeat([[0, 1]], 2, axis=0).repeat([4, 6], axis=1))
    batch = {"tokens": tokens, "attention_mask": ones, "loss_mask": ones}

    def cross_entropy(logits_BxTxV):  # numpy, mean over all 9 predictions of each row
        logits = np.asarray(logits_BxTxV, np.float64)
        log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        target = np.take_along_axis(logits, np.asarray(tokens)[:, 1:, None], -1)[..., 0]
        return np.mean(log_z - target)

    crossing = decoder.forward(teacher, tokens[:, :-1], spec)
    alone = jnp.concatenate(
        [
            decoder.forward(teacher, tokens[:, :4], spec),
            decoder.forward(teacher, tokens[:, 4:9], spec),
        ],
        axis=1,
    )
    plain, _ = qat.qat_loss(teacher, teacher, batch, spec, None, "gt")
    np.testing.assert_allclose(float(plain), cross_entropy(crossing), rtol=1e-5)
    segmented = {**batch, "segment_ids": segments}
    loss, _ = qat.qat_loss(teacher, teacher, segmented, spec, None, "gt")
    np.testing.assert_allclose(float(loss), cross_entropy(alone), rtol=1e-5)
    assert abs(float(loss) - float(plain)) > 1e-3

    # The logit loss is the soft cross-entropy to the teacher: with the student equal to the
    # teacher and both reading the mask, the entropy of each document's own distributions.
    logit, _ = qat.qat_loss(teacher, teacher, segmented, spec, None, "logit")
    z = np.asarray(alone, np.float64)
    log_p = z - z.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    np.testing.assert_allclose(float(logit), np.mean(-(np.exp(log_p) * log_p).sum(-1)), rtol=1e-5)
