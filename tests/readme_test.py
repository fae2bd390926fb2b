"""Every command block of README.md runs, with small limits, so that the README cannot rot.

Bash blocks run in one scratch directory laid out like a checkout (the commands, the configs
and `../shared` beside it). A command that names a path an earlier one named (`runs/smollm2`,
`results/...`) runs after it, in README order (`eval.py --checkpoint runs/smollm2` reads what
`train.py --workdir runs/smollm2` wrote); chains that share no path run two at a time, since
each command is a process that spends much of its time on one core (imports, loading,
tracing, XLA's compiles). Each `python train.py` / `python eval.py` line gets flags
appended that shrink its work (later flags win in both parsers); lines that set up or run the
whole suite are listed in SKIPPED and not run here (`.ci/run` runs `make test` itself). A command
this file does not know fails the test, so a new README command needs a rule here. Python blocks
run in order in one namespace.
"""

import concurrent.futures
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "tsld_jax_test_jit")

# Commands the README shows but this test does not run, by their first words.
SKIPPED = (
    "make demo",  # train.py on the embedded default: run below with small limits
    "make test",  # the suite itself
    "pip install",
    "tensorboard",
    "llama-cli",  # llama.cpp's own binary; tests/export_gguf_test.py runs the file in llama.cpp
    "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m pytest",  # the suite itself
    ".ci/py312",  # the suite on Python 3.12 (CI runs it)
    "bash bench/gpu_check.sh",  # needs a GPU; tests/gpu_check_test.py runs its CPU mode
)

SHRINK = {
    "train.py": [
        "--config.train.steps=2",
        "--config.train.warmup_steps=0",
        "--config.data.batch_size=2",
        "--config.data.block_size=32",
        "--config.data.generated_sequences=2",
        "--config.data.eval_blocks=1",
        "--config.eval.batch_size=1",
        "--config.checkpoint.every_steps=1",
        "--config.log.progress=False",
    ],
    "eval.py": ["--limit", "2", "--max-blocks", "1", "--max-gen-toks", "8", "--quiet"],
    "export.py": [],
}


def _blocks(language: str) -> list[str]:
    with open(README) as f:
        text = f.read()
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def _commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
        if line:
            commands.append(line)
    return commands


def _shrunk(command: str) -> str | None:
    """The command with its limits appended; None for a SKIPPED one."""
    if command.startswith(SKIPPED):
        return None
    words = shlex.split(command)
    if words[0] == "python" and len(words) > 1 and words[1] in SHRINK:
        return " ".join([sys.executable, *map(shlex.quote, words[1:]), *SHRINK[words[1]]])
    raise AssertionError(f"README command with no rule in tests/readme_test.py: {command}")


def test_every_readme_command_has_a_rule():
    commands = [c for block in _blocks("bash") for c in _commands(block)]
    assert any(c.startswith("python train.py") for c in commands)
    assert any(c.startswith("python eval.py") for c in commands)
    assert "make demo" in commands and "make test" in commands
    for command in commands:
        _shrunk(command)  # raises for a command without a rule


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, shared_data):
    """A scratch directory laid out like the checkout, with ../shared beside it."""
    top = tmp_path_factory.mktemp("readme")
    (top / "shared").symlink_to(shared_data.parent)
    work = top / "main"
    work.mkdir()
    for name in ("train.py", "eval.py", "export.py", "configs", "tsld_jax", "pallas"):
        (work / name).symlink_to(os.path.join(ROOT, name))
    return work


_PATHS = re.compile(r"\b(?:runs|results)/[\w.-]+")


def _chains(commands: list[str]) -> list[list[str]]:
    """The commands in chains: each chain keeps README order and holds every command that
    names a path (under runs/ or results/) another of its commands names."""
    chains: list[list[str]] = []
    owner: dict[str, int] = {}
    for command in commands:
        paths = set(_PATHS.findall(command))
        joined = sorted({owner[p] for p in paths if p in owner})
        if joined:
            index = joined[0]
            for other in reversed(joined[1:]):  # a command that links two chains joins them
                chains[index] += chains[other]
                chains[other] = []
                for p, i in owner.items():
                    if i == other:
                        owner[p] = index
        else:
            index = len(chains)
            chains.append([])
        chains[index].append(command)
        for p in paths:
            owner[p] = index
    return [chain for chain in chains if chain]


def test_chains_keep_dependent_commands_in_order():
    commands = [
        "python eval.py --output results/a.json",
        "python train.py --workdir runs/x",
        "python train.py --workdir runs/y",
        "python eval.py --checkpoint runs/x",
        "python export.py --checkpoint runs/x --output m.gguf",
    ]
    assert _chains(commands) == [
        [commands[0]],
        [commands[1], commands[3], commands[4]],
        [commands[2]],
    ]
    linked = commands[:3] + ["python tool.py runs/x runs/y"]
    assert _chains(linked) == [[commands[0]], [commands[1], commands[2], linked[3]]]


@pytest.mark.slow
def test_readme_bash_blocks_run(checkout):
    env = {
        **{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "JAX_COMPILATION_CACHE_DIR": CACHE,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    commands = [c for block in _blocks("bash") for c in _commands(block) if _shrunk(c)]

    def run_chain(chain: list[str]) -> list[tuple[str, subprocess.CompletedProcess]]:
        done = []
        for command in chain:
            result = subprocess.run(
                _shrunk(command), shell=True, cwd=checkout, env=env, capture_output=True,
                text=True,
            )  # fmt: skip
            done.append((command, result))
            if result.returncode != 0:
                break  # what follows in the chain reads what this one should have written
        return done

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        finished = [run for chain in pool.map(run_chain, _chains(commands)) for run in chain]
    for command, result in finished:
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    assert len(finished) == len(commands) >= 7
    assert (checkout / "results" / "smollm2_ptb.json").exists()
    assert (checkout / "runs" / "smollm2" / "results.json").exists()


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    blocks = _blocks("python")
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, README, "exec"), namespace)  # noqa: S102
    assert namespace["logits_BxTxV"].shape[-1] == namespace["model"].spec.vocab_size
    assert (tmp_path / "smollm2_hf" / "config.json").exists()
