"""train.py --multihost with two real processes of 4 CPU devices each (jax.distributed over
loopback, gloo collectives): the single-process losses, one metrics line per step, a checkpoint
both save that a fresh pair restores exactly, and the workdir lock held by process 0 only."""

import json
import os
import shutil
import socket
import subprocess

import jax
import ml_collections
import numpy as np
import train_test

from tsld_jax import checkpoint
from tsld_jax import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "tsld_jax_test_jit")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, shared_data, devices, *flags):
    env = {
        **os.environ,
        # conftest's scheduler flag: collectives on 2 cores deadlock under the concurrent one.
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
        "--xla_cpu_enable_concurrency_optimized_scheduler=false",
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": CACHE,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    command = train_test._command(
        workdir,
        shared_data,
        "--config.train.steps=4",
        "--config.checkpoint.every_steps=2",
        "--config.data.eval_blocks=1",
        "--config.mesh.tensor=2",  # 8 devices: data 4 x tensor 2 (the batch is 4)
        *flags,
    )
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _pair(workdir, shared_data):
    address = f"127.0.0.1:{_free_port()}"
    return [
        _launch(
            workdir,
            shared_data,
            4,
            "--multihost",
            f"--coordinator_address={address}",
            "--num_processes=2",
            f"--process_id={i}",
        )
        for i in range(2)
    ]


def _finish(processes, timeout=600):
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
    return [(p.returncode, out, err) for p, (out, err) in zip(processes, outputs, strict=True)]


def _losses(workdir):
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def _params(workdir):
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    params, _, _, step = checkpoint.restore_params(config, str(workdir))
    return params, step


def test_a_held_workdir_stops_both_processes(tmp_path, shared_data):
    # Process 0 alone tries the lock and tells process 1: both stop with the holder's line, and
    # neither waits in a collective for the other.
    workdir = tmp_path / "held"
    workdir_lib.prepare(str(workdir))
    with workdir_lib.acquire(str(workdir)):
        results = _finish(_pair(workdir, shared_data), timeout=300)
    for code, _, err in results:
        assert code == 2, err[-2000:]
    assert "is in use by another train.py run" in results[0][2], results[0][2][-2000:]
    assert "process 0 could not take it" in results[1][2], results[1][2][-2000:]


def test_two_processes_match_one_and_resume_exactly(tmp_path, shared_data):
    pair_dir, single_dir = tmp_path / "pair", tmp_path / "single"
    # Both at once: the single 8-device process and the two 4-device ones.
    results = _finish([*_pair(pair_dir, shared_data), _launch(single_dir, shared_data, 8)])
    for code, _, err in results:
        assert code == 0, err[-3000:]
    pair, single = _losses(pair_dir), _losses(single_dir)
    assert [step for step, _ in pair] == [1, 2, 3, 4]  # process 0 alone writes the metrics
    np.testing.assert_allclose([x for _, x in pair], [x for _, x in single], rtol=1e-6)
    lock = json.loads(open(pair_dir / workdir_lib.LOCK_NAME).read() or "{}")
    assert lock == {}  # released at the end

    # A fresh pair resumes from the step-2 checkpoint both processes saved, and repeats steps
    # 3 and 4 exactly.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(pair_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "4")
    results = _finish(_pair(resumed_dir, shared_data))
    for code, out, err in results:
        assert code == 0, err[-3000:]
        assert "resuming from step 2" in out
    assert _losses(resumed_dir)[4:] == pair[2:]
    (want, want_step), (got, got_step) = _params(pair_dir), _params(resumed_dir)
    assert want_step == got_step == 4
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
