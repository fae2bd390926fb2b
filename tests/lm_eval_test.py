"""lm-evaluation-harness scores our model (tsld_jax/lm_eval_model.py) with eval.py's numbers."""

import collections
import types

import numpy as np
import pytest
import tiny_models

lm_eval = pytest.importorskip("lm_eval")  # the dev extra installs it

from lm_eval.tasks import TaskManager  # noqa: E402

from tsld_jax import lm_eval_model  # noqa: E402  (registers "tsld-jax")
from tsld_jax.evaluation import cli  # noqa: E402
from tsld_jax.models import decoder  # noqa: E402

LIMIT = 20
# SmolLM2-135M: fewer questions (each is a 135M-parameter forward per choice on 2 cores).
SMOLLM2_LIMIT = 10


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, shared_data):
    directory = tmp_path_factory.mktemp("gpt2_lm_eval")
    tiny_models.save("gpt2", str(directory))
    text = (shared_data / "ptb" / "ptb.valid.txt").read_text().split()[:20000]
    words = [w for w, _ in collections.Counter(text).most_common(tiny_models.VOCAB - 1)]
    tiny_models.save_word_tokenizer(str(directory), words)
    return str(directory)


def _harness(model_args, shared_data, limit=LIMIT):
    results = lm_eval.simple_evaluate(
        model="tsld-jax",
        model_args=model_args,
        tasks=["tsld_arc_easy", "tsld_piqa"],
        task_manager=TaskManager(
            include_path=lm_eval_model.TASKS_DIR, metadata={"data_dir": str(shared_data)}
        ),
        limit=limit,
        batch_size=8,
        log_samples=True,
    )
    return results["results"], results["samples"]


def _eval_py(model_args, shared_data, tmp_path, limit=LIMIT):
    out = tmp_path / "eval.json"
    argv = ["--task", "arc_easy,piqa", "--data-dir", str(shared_data), "--limit", str(limit)]
    argv += ["--model", model_args["path"], "--output", str(out), "--quiet"]
    if "quant" in model_args:
        argv += ["--quant", model_args["quant"]]
    assert cli.main(argv) == 0
    import json

    return {r["task"]: r for r in json.loads(out.read_text())["results"]}


def _check_equal(harness, samples, ours, limit=LIMIT):
    for task in ("arc_easy", "piqa"):
        theirs = harness[f"tsld_{task}"]
        assert len(samples[f"tsld_{task}"]) == ours[task]["n"] == limit
        for metric in ("acc", "acc_norm"):
            assert theirs[f"{metric},none"] == ours[task][metric], (task, metric)


def test_harness_equals_eval_py_on_a_tiny_ternary_model(tiny_dir, shared_data, tmp_path):
    # Fake-quantized (TWN) here, float on SmolLM2 below.
    model_args = {"path": tiny_dir, "quant": "twn"}
    harness, samples = _harness(model_args, shared_data)
    ours = _eval_py(model_args, shared_data, tmp_path)
    _check_equal(harness, samples, ours)
    # The same questions, in the same order: the harness's gold labels are eval.py's.
    from tsld_jax.evaluation import choice

    for task in ("arc_easy", "piqa"):
        docs = choice.load_docs(task, data_dir=str(shared_data), limit=LIMIT)
        assert [s["target"] for s in samples[f"tsld_{task}"]] == [d.gold for d in docs]


def test_rolling_and_generation(tiny_dir):
    # The word tokenizer has no BOS/EOS, so the prefix token is given.
    lm = lm_eval_model.TsldJaxLM(path=tiny_dir, batch_size=4, prefix_token_id=0)
    text = " the company said it will sell the shares"
    ids = lm._encode(text)
    request = types.SimpleNamespace(args=(text,))
    (rolling,) = lm.loglikelihood_rolling([request])
    # Independent reference: one forward over prefix + text, log-softmax summed by hand.
    tokens = np.array([[lm.prefix_token_id, *ids]], np.int32)
    logits = np.asarray(decoder.forward(lm.model.params, tokens, lm.model.spec), np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    expected = sum(logp[i, t] for i, t in enumerate(ids))
    np.testing.assert_allclose(rolling, expected, rtol=1e-5)
    (continuation,) = lm.generate_until(
        [types.SimpleNamespace(args=(text, {"until": ["\n"], "max_gen_toks": 5}))]
    )
    assert isinstance(continuation, str) and "\n" not in continuation


@pytest.mark.slow
def test_harness_equals_eval_py_on_smollm2(smollm2, shared_data, tmp_path):
    harness, samples = _harness({"path": "smollm2-135m"}, shared_data, SMOLLM2_LIMIT)
    ours = _eval_py({"path": "smollm2-135m"}, shared_data, tmp_path, SMOLLM2_LIMIT)
    _check_equal(harness, samples, ours, SMOLLM2_LIMIT)


@pytest.mark.parametrize(
    "model_args",
    [
        ["path=/no/such/model"],
        ["path=./missing,quant=twn"],
        ["checkpoint=/no/such/run", "step=3"],
        ["packed=missing.safetensors,tokenizer=gpt2"],
    ],
)
def test_missing_model_path_is_one_line(model_args, monkeypatch, capsys):
    import lm_eval.__main__

    def harness():
        raise AssertionError("the harness started (and loaded its tasks)")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", harness)
    argv = ["--model", "tsld-jax", "--model_args", *model_args, "--tasks", "tsld_arc_easy"]
    # Before: 39 lines of traceback, after the harness had loaded its task definitions.
    assert lm_eval_model.main(argv) == 2
    err = capsys.readouterr().err
    key, value = model_args[0].split(",")[0].split("=")
    assert err == f"error: --model_args {key}={value}: no such file or directory\n"
