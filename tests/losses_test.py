"""The distillation losses against numpy transcriptions of PAPER.md, and chunked vs naive TSLD."""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models

from tsld_jax import losses, qat
from tsld_jax.models import decoder, load_model

B, T, V = 3, 7, 13
TAU = 10.0


# ----------------------------------------------------------------------------- numpy reference
def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_label_ce(logits, labels):
    return -np.take_along_axis(np_log_softmax(logits), labels[..., None], -1)[..., 0]


def np_soft_ce(student, teacher):
    return -(np.exp(np_log_softmax(teacher)) * np_log_softmax(student)).sum(-1)


def np_gt(student, labels, mask):
    return (np_label_ce(student, labels) * mask).sum() / mask.sum()


def np_logit(student, teacher, mask):
    return (np_soft_ce(student, teacher) * mask).sum() / mask.sum()


def np_token_scales(teacher, labels, mask):
    scales = np.zeros(mask.shape)
    c = np_label_ce(teacher, labels) / TAU
    for b in range(mask.shape[0]):
        valid = mask[b] > 0
        if not valid.any():
            continue
        e = np.exp(c[b, valid] - c[b, valid].max())
        scales[b, valid] = e / e.sum()
    return scales


def np_tsld(student, teacher, labels, mask):
    scales = np_token_scales(teacher, labels, mask)
    return sum(
        (scales[b] * np_soft_ce(student, teacher)[b])[mask[b] > 0].sum() for b in range(len(mask))
    )


def np_layer_mse(student, teacher, valid):
    # One layer: mean of squared differences over the valid elements (`valid` indexes the
    # leading axes; a hidden state's features all count).
    return ((student - teacher) ** 2)[valid].mean()


def np_l2l(student, teacher, s_hidden, t_hidden, s_probs, t_probs, mask):
    valid_tokens = mask > 0
    hidden = sum(np_layer_mse(s, t, valid_tokens) for s, t in zip(s_hidden, t_hidden, strict=True))
    causal = np.tril(np.ones((T, T), bool))
    pairs = causal[None] & (mask[:, :, None] > 0) & (mask[:, None, :] > 0)
    valid_pairs = np.broadcast_to(pairs[:, None], s_probs.shape[1:])
    probs = sum(np_layer_mse(s, t, valid_pairs) for s, t in zip(s_probs, t_probs, strict=True))
    return np_logit(student, teacher, mask) + hidden + probs


def np_softmax(x):
    return np.exp(np_log_softmax(x))


# ----------------------------------------------------------------------------- fixtures
def _data(dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    student = jnp.asarray(3.0 * rng.normal(size=(B, T, V)), dtype)
    teacher = jnp.asarray(3.0 * rng.normal(size=(B, T, V)), dtype)
    labels = jnp.asarray(rng.integers(0, V, size=(B, T)), jnp.int32)
    return student, teacher, labels


def _mask(masked):
    mask = np.ones((B, T), np.float32)
    if masked:
        mask[0, 5:] = 0  # right padding
        mask[2, :2] = 0  # left padding
        mask[1, 3] = 0  # a hole
    return mask


def _np(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _call(fn, jit, *args, **kwargs):
    return (jax.jit(lambda *a: fn(*a, **kwargs)) if jit else lambda *a: fn(*a, **kwargs))(*args)


MODES = [
    pytest.param(False, None, id="eager-naive"),
    pytest.param(True, None, id="jit-naive"),
    pytest.param(True, 6, id="jit-chunked"),
    pytest.param(False, 6, id="eager-chunked"),
]


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize(
    "jit,chunk,masked,dtype",
    [
        pytest.param(*mode.values, masked, jnp.float32, id=f"{mode.id}-{name}-f32")
        for mode in MODES
        for masked, name in [(False, "nomask"), (True, "mask")]
    ]
    + [
        pytest.param(True, None, True, jnp.bfloat16, id="jit-naive-mask-bf16"),
        pytest.param(True, 6, True, jnp.bfloat16, id="jit-chunked-mask-bf16"),
    ],
)
def test_losses_match_numpy(jit, chunk, masked, dtype):
    rtol = 2e-6
    student, teacher, labels = _data(dtype)
    mask = _mask(masked)
    jmask = jnp.asarray(mask) if masked else None
    s, t, y = _np(student), _np(teacher), np.asarray(labels)
    expected = {
        "gt": np_gt(s, y, mask),
        "logit": np_logit(s, t, mask),
        "logit_gt": np_logit(s, t, mask) + np_gt(s, y, mask),
        "tsld": np_tsld(s, t, y, mask),
    }
    got = {
        "gt": _call(losses.gt, jit, student, labels, jmask),
        "logit": _call(losses.logit, jit, student, teacher, jmask, chunk_size=chunk),
        "logit_gt": _call(losses.logit_gt, jit, student, teacher, labels, jmask, chunk_size=chunk),
        "tsld": _call(losses.tsld, jit, student, teacher, labels, jmask, chunk_size=chunk),
    }
    for name, value in got.items():
        assert value.dtype == jnp.float32 and value.shape == (), name
        np.testing.assert_allclose(float(value), expected[name], rtol=rtol, err_msg=name)
    tsld_total = functools.partial(losses.distillation_loss, "tsld")
    total, parts = _call(tsld_total, jit, student, teacher, labels, jmask, chunk_size=chunk)
    np.testing.assert_allclose(float(total), expected["gt"] + expected["tsld"], rtol=rtol)
    np.testing.assert_allclose(float(parts["tsld"]), expected["tsld"], rtol=rtol)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("jit,chunk", MODES)
def test_gradients_match_numpy(jit, chunk, masked):
    student, teacher, labels = _data()
    mask = _mask(masked)
    jmask = jnp.asarray(mask) if masked else None
    s, t, y = _np(student), _np(teacher), np.asarray(labels)
    q, p = np_softmax(s), np_softmax(t)
    one_hot = np.eye(V)[y]
    weight = (mask / mask.sum())[..., None]
    scales = np_token_scales(t, y, mask)[..., None]
    expected = {
        "gt": weight * (q - one_hot),
        "logit": weight * (q - p),
        "tsld": scales * (q - p),  # the scales are constants: no term from the teacher's CE
    }
    fns = {
        "gt": lambda x: losses.gt(x, labels, jmask),
        "logit": lambda x: losses.logit(x, teacher, jmask, chunk_size=chunk),
        "tsld": lambda x: losses.tsld(x, teacher, labels, jmask, chunk_size=chunk),
    }
    for name, fn in fns.items():
        grad = (jax.jit(jax.grad(fn)) if jit else jax.grad(fn))(student)
        np.testing.assert_allclose(np.asarray(grad), expected[name], atol=1e-7, err_msg=name)


@pytest.mark.parametrize("kind", ["logit", "tsld", "logit_gt", "l2l"])
def test_teacher_receives_no_gradient(kind):
    student, teacher, labels = _data()
    aux = _aux(np.random.default_rng(3))

    def loss(teacher_logits, teacher_hidden):
        teacher_aux = {"hidden": teacher_hidden, "attn_probs": aux["teacher_probs"]}
        student_aux = {"hidden": aux["student_hidden"], "attn_probs": aux["student_probs"]}
        return losses.distillation_loss(
            kind, student, teacher_logits, labels, student_aux=student_aux, teacher_aux=teacher_aux
        )[0]

    grads = jax.grad(loss, argnums=(0, 1))(teacher, aux["teacher_hidden"])
    for grad in jax.tree.leaves(grads):
        np.testing.assert_array_equal(np.asarray(grad), 0.0)


# ----------------------------------------------------------------------------- per-token function
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_token_losses_match_numpy_on_single_tokens(jit, dtype):
    student, teacher, labels = _data(dtype, seed=4)
    token_losses = jax.jit(losses.token_losses) if jit else losses.token_losses
    s, t, y = _np(student), _np(teacher), np.asarray(labels)
    for b, position in [(0, 0), (1, 3), (2, T - 1)]:
        got = token_losses(student[b, position], teacher[b, position], labels[b, position])
        # PAPER.md: CE_t = -sum_v p_t[v] log q[v]; c_t = CE(z_t[t], y_t); gt = CE(z_s[t], y_t).
        log_q, p = np_log_softmax(s[b, position]), np_softmax(t[b, position])
        expected = {
            "soft_ce": -(p * log_q).sum(),
            "student_ce": -log_q[y[b, position]],
            "teacher_ce": -np_log_softmax(t[b, position])[y[b, position]],
        }
        for name, value in expected.items():
            field = getattr(got, name)
            assert field.dtype == jnp.float32 and field.shape == (), name
            np.testing.assert_allclose(float(field), value, rtol=2e-6, err_msg=name)


def test_a_label_outside_the_vocabulary_reads_nan_not_a_clamped_logit():
    student, teacher, _ = _data()
    got = losses.token_losses(student[0, 0], teacher[0, 0], jnp.asarray(V, jnp.int32))
    assert np.isnan(float(got.student_ce)) and np.isnan(float(got.teacher_ce))
    assert np.isfinite(float(got.soft_ce))


def test_tsld_from_the_vmapped_token_function_matches_numpy():
    # The design in one line: TSLD = token scales of the teacher's c_t times CE_t, with both
    # read from `token_losses` mapped over every token.
    student, teacher, labels = _data()
    mask = _mask(True)
    stats = jax.vmap(jax.vmap(losses.token_losses))(student, teacher, labels)
    scales = losses.token_scales(stats.teacher_ce, jnp.asarray(mask), TAU)
    got = jnp.sum(jnp.where(jnp.asarray(mask) > 0, scales * stats.soft_ce, 0.0))
    expected = np_tsld(_np(student), _np(teacher), np.asarray(labels), mask)
    np.testing.assert_allclose(float(got), expected, rtol=2e-6)


@pytest.mark.parametrize("chunk", [1, 6, 64])
def test_chunked_backward_matches_autodiff_of_the_token_function(chunk):
    # Arbitrary cotangents on each output: the hand-written, chunked backward against plain
    # autodiff through the vmapped per-token function (the unchunked reference).
    student, teacher, labels = _data(seed=5)
    rng = np.random.default_rng(6)
    weights = [jnp.asarray(rng.normal(size=(B, T)), jnp.float32) for _ in range(3)]

    def objective(x, chunk_size):
        stats = losses._token_stats(x, teacher, labels, chunk_size=chunk_size)
        return sum(jnp.sum(w * field) for w, field in zip(weights, stats, strict=True))

    def reference(x):
        stats = jax.vmap(jax.vmap(losses.token_losses))(x, teacher, labels)
        # The teacher's c_t is a constant: no gradient through it even though it reads only z_t.
        return jnp.sum(weights[0] * stats.soft_ce) + jnp.sum(weights[1] * stats.student_ce)

    expected = jax.grad(reference)(student)
    for chunk_size in (chunk, None):
        got = jax.jit(jax.grad(objective), static_argnums=1)(student, chunk_size)
        scale = np.abs(np.asarray(expected)).max()
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(expected), rtol=1e-6, atol=1e-6 * scale
        )


# ----------------------------------------------------------------------------- masks
def test_masked_positions_take_part_in_nothing():
    student, teacher, labels = _data()
    mask = jnp.asarray(_mask(True))
    noise = 50.0 * jax.random.normal(jax.random.key(9), student.shape)
    hidden = (mask == 0)[..., None]
    student2 = jnp.where(hidden, student + noise, student)
    teacher2 = jnp.where(hidden, teacher - noise, teacher)
    labels2 = jnp.where(mask == 0, (labels + 5) % V, labels)
    for kind, chunk in [
        ("gt", None),
        ("logit_gt", None),
        ("logit_gt", 6),
        ("tsld", None),
        ("tsld", 6),
    ]:

        def loss(x, t, y, k=kind, c=chunk):
            return losses.distillation_loss(k, x, t, y, mask, chunk_size=c)[0]

        value_and_grad = jax.jit(jax.value_and_grad(loss))
        a, grad = value_and_grad(student, teacher, labels)
        b, _ = value_and_grad(student2, teacher2, labels2)
        np.testing.assert_allclose(float(a), float(b), rtol=1e-6, err_msg=kind)
        np.testing.assert_array_equal(np.asarray(grad)[np.asarray(mask) == 0], 0.0)


def test_token_scales_ignore_masked_positions_and_sum_to_one():
    _, teacher, labels = _data()
    mask = _mask(True)
    mask[1] = 0  # a fully masked sequence contributes nothing and stays finite
    teacher_ce = jnp.asarray(np_label_ce(_np(teacher), np.asarray(labels)), jnp.float32)
    scales = np.asarray(losses.token_scales(teacher_ce, jnp.asarray(mask), TAU))
    np.testing.assert_allclose(scales.sum(-1), [1.0, 0.0, 1.0], rtol=1e-6)
    assert (scales[mask == 0] == 0).all()
    np.testing.assert_allclose(
        scales[[0, 2]], np_token_scales(_np(teacher), np.asarray(labels), mask)[[0, 2]], rtol=1e-6
    )
    student, _, _ = _data(seed=1)
    for kind in losses.KINDS[:3] + ("tsld",):
        value = losses.distillation_loss(kind, student, teacher, labels, jnp.asarray(mask))[0]
        assert np.isfinite(float(value)), kind


# ----------------------------------------------------------------------------- chunking
@pytest.mark.parametrize(  # B * T = 3 * 7 tokens; chunks of max(1, chunk // 3) positions
    "chunk,dtype",
    [(1, jnp.float32), (6, jnp.float32), (9, jnp.float32), (64, jnp.float32), (6, jnp.bfloat16)],
)
def test_chunked_equals_naive_with_gradients(chunk, dtype):
    student, teacher, labels = _data(dtype, seed=2)
    mask = jnp.asarray(_mask(True))
    for kind in ("logit", "logit_gt", "tsld"):

        def loss(x, c, k=kind):
            return losses.distillation_loss(k, x, teacher, labels, mask, chunk_size=c)[0]

        naive, naive_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)(student, None)
        lean, lean_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)(student, chunk)
        assert lean_grad.dtype == dtype
        np.testing.assert_allclose(float(lean), float(naive), rtol=1e-6, err_msg=kind)
        naive_grad, lean_grad = _np(naive_grad), _np(lean_grad)
        if dtype == jnp.float32:
            scale = np.abs(naive_grad).max()
            np.testing.assert_allclose(lean_grad, naive_grad, rtol=1e-6, atol=1e-6 * scale)
        else:  # both round the same float32 gradient to bf16; allow one ulp for ties
            np.testing.assert_allclose(lean_grad, naive_grad, rtol=2**-7)


# ----------------------------------------------------------------------------- l2l
L, H, D, E = 2, 2, 5, 3


def _aux(rng):
    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    def probs(*shape):
        return jax.nn.softmax(3.0 * normal(*shape), axis=-1)

    # Hugging Face's hidden-state tuple: L + 1 entries, the last one of another width (OPT-350m's
    # project_out) to check that every entry is its own mean.
    return {
        "student_hidden": (*(normal(B, T, D) for _ in range(L)), normal(B, T, E)),
        "teacher_hidden": (*(normal(B, T, D) for _ in range(L)), normal(B, T, E)),
        "student_probs": probs(L, B, H, T, T),
        "teacher_probs": probs(L, B, H, T, T),
    }


def _np_aux(aux):
    return [tuple(map(_np, a)) if isinstance(a, tuple) else _np(a) for a in aux.values()]


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_l2l_matches_numpy(jit, masked):
    student, teacher, _ = _data(jnp.bfloat16)
    aux = _aux(np.random.default_rng(1))
    mask = _mask(masked)
    jmask = jnp.asarray(mask) if masked else None
    got = _call(losses.l2l, jit, student, teacher, *aux.values(), jmask)
    expected = np_l2l(_np(student), _np(teacher), *_np_aux(aux), mask)
    np.testing.assert_allclose(float(got), expected, rtol=2e-6)
    total, parts = losses.distillation_loss(
        "l2l",
        student,
        teacher,
        jnp.zeros((B, T), jnp.int32),
        jmask,
        student_aux={"hidden": aux["student_hidden"], "attn_probs": aux["student_probs"]},
        teacher_aux={"hidden": aux["teacher_hidden"], "attn_probs": aux["teacher_probs"]},
    )
    np.testing.assert_allclose(float(total), expected, rtol=2e-6)
    assert set(parts) >= {"logit", "hidden_mse", "attn_mse"}


def test_l2l_ignores_the_non_causal_probabilities():
    student, teacher, _ = _data()
    aux = _aux(np.random.default_rng(1))
    upper = jnp.triu(jnp.ones((T, T), bool), k=1)[None, None, None]
    perturbed = jnp.where(upper, aux["student_probs"] + 100.0, aux["student_probs"])
    args = (aux["student_hidden"], aux["teacher_hidden"])
    a = losses.l2l(student, teacher, *args, aux["student_probs"], aux["teacher_probs"])
    b = losses.l2l(student, teacher, *args, perturbed, aux["teacher_probs"])
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


# ----------------------------------------------------------------------------- l2l vs the authors
# Our l2l against aiha-lab/TSLD's trainer (`KDTrainer.compute_loss`, its `l2l` option: kd_pred
# and kd_l2l) evaluated on transformers' own outputs of a tiny OPT and a tiny LLaMA, teacher and
# perturbed student, run with eager attention, output_hidden_states and output_attentions.
HF_BATCH, HF_LENGTH = 2, 12


def _authors_l2l(student, teacher, real=None):
    """The authors' l2l on two transformers outputs, as their trainer computes it.

    With `real` None, line for line theirs: `logit` over positions 0..T-2, MSELoss of every
    entry of `hidden_states` (the last is after the final norm), and the MSE of the attentions
    (post-softmax probabilities) over the causal lower triangle. `real`, (B, T) bool, is a
    padded batch's real tokens: every mean then runs over real positions only (their blocks had
    no padding). Returns (total, logit, hidden, attention).
    """
    torch = pytest.importorskip("torch")
    mse = torch.nn.MSELoss()
    student_logits = student.logits[..., :-1, :]
    teacher_logits = teacher.logits[..., :-1, :].float()
    soft_ce = torch.sum(
        -torch.softmax(teacher_logits, -1) * torch.log_softmax(student_logits, -1), dim=-1
    )
    pred = soft_ce.mean() if real is None else soft_ce[real[:, 1:]].mean()
    hidden = 0
    for s, t in zip(student.hidden_states, teacher.hidden_states, strict=True):
        hidden += mse(s, t.float()) if real is None else mse(s[real], t[real].float())
    attention = 0
    for s, t in zip(student.attentions, teacher.attentions, strict=True):
        s = torch.where(s <= -1e5, 0, s)  # theirs; a no-op on probabilities
        t = torch.where(t <= -1e5, 0, t)
        keep = torch.tril(torch.ones_like(t.float())).bool()
        if real is not None:
            keep = keep & real[:, None, :, None] & real[:, None, None, :]
        attention += ((t - s)[keep] ** 2).mean()
    return [float(x) for x in (pred + hidden + attention, pred, hidden, attention)]


@pytest.fixture(scope="module", params=["opt_pre", "llama_gqa_untied"])
def teacher_and_student(request, tmp_path_factory):
    """A tiny random HF model and a perturbed copy, both saved, both in eager attention."""
    torch = pytest.importorskip("torch")
    teacher_dir = tmp_path_factory.mktemp(f"{request.param}_teacher")
    student_dir = tmp_path_factory.mktemp(f"{request.param}_student")
    teacher = tiny_models.build(request.param, str(teacher_dir))
    student = copy.deepcopy(teacher)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.03 * torch.randn_like(p))
    student.save_pretrained(str(student_dir))
    models = []
    for model, directory in ((teacher, teacher_dir), (student, student_dir)):
        model.set_attn_implementation("eager")  # sdpa returns no attention probabilities
        models.append((model, load_model(str(directory), load_tokenizer=False)))
    return models


def _hf_batch(padded):
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, tiny_models.VOCAB, size=(HF_BATCH, HF_LENGTH))
    attention = np.ones((HF_BATCH, HF_LENGTH), np.int32)
    if padded:
        attention[1, 8:] = 0  # right padding on the second row
    return tokens, attention


def _hf_outputs(model, tokens, attention):
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(attention),
            output_hidden_states=True,
            output_attentions=True,
        )


def _collect(loaded, tokens, attention):
    return decoder.forward(
        loaded.params,
        jnp.asarray(tokens),
        loaded.spec,
        mask_BxT=jnp.asarray(attention),
        collect=("hidden", "attn_probs"),
    )


def test_collected_hidden_states_and_probabilities_are_transformers_own(teacher_and_student):
    (model, loaded), _ = teacher_and_student
    tokens, attention = _hf_batch(padded=True)
    theirs = _hf_outputs(model, tokens, attention)
    _, aux = _collect(loaded, tokens, attention)
    real = attention.astype(bool)
    assert len(aux["hidden"]) == len(theirs.hidden_states) == loaded.spec.num_layers + 1
    for i, (ours, hf) in enumerate(zip(aux["hidden"], theirs.hidden_states, strict=True)):
        np.testing.assert_allclose(np.asarray(ours)[real], hf.numpy()[real], atol=2e-5, err_msg=i)
    probs = np.asarray(aux["attn_probs"])
    assert probs.shape[0] == len(theirs.attentions)
    for i, hf in enumerate(theirs.attentions):
        # Every query of a real token (padded keys get probability 0 in both).
        rows = real[:, None, :, None] & np.ones(probs.shape[2:], bool)[None]
        np.testing.assert_allclose(probs[i][rows], hf.numpy()[rows], atol=2e-6, err_msg=i)


@pytest.mark.parametrize("padded", [False, True], ids=["block", "padded"])
def test_l2l_equals_the_authors_formula_on_transformers_outputs(teacher_and_student, padded):
    torch = pytest.importorskip("torch")
    (teacher, teacher_loaded), (student, student_loaded) = teacher_and_student
    tokens, attention = _hf_batch(padded)
    real = torch.tensor(attention.astype(bool)) if padded else None
    expected = _authors_l2l(
        _hf_outputs(student, tokens, attention), _hf_outputs(teacher, tokens, attention), real
    )
    batch = {"tokens": jnp.asarray(tokens), "attention_mask": jnp.asarray(attention)}
    loss_fn = jax.jit(qat.qat_loss, static_argnums=(3, 4, 5))
    total, parts = loss_fn(
        student_loaded.params, teacher_loaded.params, batch, student_loaded.spec, None, "l2l"
    )
    got = [
        float(total),
        float(parts["logit"]),
        float(parts["hidden_mse"]),
        float(parts["attn_mse"]),
    ]
    # Each term is far from 0, so a wrong reading of one (pre-softmax scores, the last block's
    # output before the final norm, a position left out) moves it far beyond the tolerance.
    assert min(expected) > 1e-3, expected
    names = ["total", "logit", "hidden", "attention"]
    for name, value, want in zip(names, got, expected, strict=True):
        np.testing.assert_allclose(value, want, rtol=2e-5, err_msg=name)


# ----------------------------------------------------------------------------- errors
def test_errors():
    student, teacher, labels = _data()
    with pytest.raises(ValueError, match="unknown distillation loss"):
        losses.distillation_loss("kl", student, teacher, labels)
    with pytest.raises(ValueError, match="needs teacher logits"):
        losses.distillation_loss("tsld", student, None, labels)
    with pytest.raises(ValueError, match="needs student_aux"):
        losses.distillation_loss("l2l", student, teacher, labels)
    with pytest.raises(ValueError, match="mask"):
        losses.gt(student, labels, jnp.ones((B, T + 1)))
    with pytest.raises(ValueError, match="chunk_size"):
        losses.logit(student, teacher, chunk_size=0)
    gt_only = losses.distillation_loss("gt", student, None, labels)[0]
    np.testing.assert_allclose(float(gt_only), float(losses.gt(student, labels)), rtol=1e-7)
