"""train.py on token shards (data.name=shards): a run killed with SIGKILL and restarted sees
exactly the batches an unbroken run sees (its losses and final weights are bit-identical), and
the periodic perplexity reads the held-out shards of data.eval_path."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
import train_test

from tsld_jax.data import prepare
from tsld_jax.models import named

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("shards")
    out = {}
    for split, lines in (("train", 3000), ("valid", 300)):
        text = open(shared_data / "ptb" / f"ptb.{split}.txt").read().splitlines()[:lines]
        source = root / f"{split}.txt"
        source.write_text("\n".join(text))
        out[split] = str(root / split)
        prepare.prepare(
            [str(source)], out[split], named.ByteTokenizer(), "random", workers=0, log=print
        )
    return out


def _train(workdir, corpora, *flags):
    command = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--config",
        os.path.join(ROOT, "configs", "smoke.py"),
        "--workdir",
        str(workdir),
        "--config.data.name=shards",
        f"--config.data.path={corpora['train']}",
        f"--config.data.eval_path={corpora['valid']}",
        "--config.data.workers=2",
        "--config.train.steps=8",
        "--config.checkpoint.every_steps=2",
        "--config.eval.every_steps=4",
        "--config.log.progress=False",
        "--config.eval.baselines=False",
        *flags,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, env=train_test._env(), timeout=600
    )


def _losses(workdir):
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_sigkill_resume_sees_the_unbroken_runs_batches(corpora, tmp_path):
    unbroken = _train(tmp_path / "unbroken", corpora)
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]
    records = [json.loads(line) for line in open(tmp_path / "unbroken" / "metrics.jsonl")]
    assert [r["step"] for r in records if "eval_ppl" in r] == [4, 8, 8]  # periodic + final

    killed = _train(tmp_path / "killed", corpora, "--config.debug.sigkill_after_step=5")
    assert killed.returncode == -signal.SIGKILL
    meta = json.load(open(tmp_path / "killed" / "checkpoints" / "4" / "meta" / "metadata"))
    assert meta["data"]["next_index"] == 4  # grain's iterator state, in the checkpoint
    resumed = _train(tmp_path / "killed", corpora)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 4" in resumed.stdout

    want, got = _losses(tmp_path / "unbroken"), _losses(tmp_path / "killed")
    assert [got[s] for s in range(5, 9)] == [want[s] for s in range(5, 9)]  # bit for bit
    (expected, step), (params, got_step) = (
        train_test._final_params(tmp_path / "unbroken"),
        train_test._final_params(tmp_path / "killed"),
    )
    assert step == got_step == 8
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_document_attention_reaches_the_step(corpora, tmp_path):
    """data.document_attention: a short run trains; the segment ids reach the step, so its
    first loss (same weights, same batch) differs from the run's without them."""
    short = ("--config.train.steps=2", "--config.eval.every_steps=0")
    runs = {}
    for flag in ("True", "False"):
        workdir = tmp_path / flag
        result = _train(workdir, corpora, *short, f"--config.data.document_attention={flag}")
        assert result.returncode == 0, result.stderr[-3000:]
        runs[flag] = _losses(workdir)
    assert sorted(runs["True"]) == [1, 2] and all(np.isfinite(list(runs["True"].values())))
    assert runs["True"][1] != runs["False"][1]


def test_shards_made_with_another_tokenizer_are_one_error_line(corpora, tmp_path):
    manifest = json.load(open(os.path.join(corpora["valid"], "manifest.json")))
    other = tmp_path / "other"
    other.mkdir()
    manifest["tokenizer"]["sha256"] = "f" * 64
    manifest["tokenizer"]["name"] = "some-other-model"
    for entry in manifest["shards"]:
        for suffix in (".bin", ".idx"):
            name = entry["name"] + suffix
            os.symlink(os.path.join(corpora["valid"], name), other / name)
    (other / "manifest.json").write_text(json.dumps(manifest))
    result = _train(tmp_path / "run", {**corpora, "train": str(other)})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "other/manifest.json" in lines[-1], lines[-3:]
    assert "some-other-model" in lines[-1] and "Traceback" not in result.stderr
