"""Every fenced block of README.md is run, with small limits, or is named here with the reason it
is not, so that the README cannot rot.

Shell blocks (`bash`, `sh`) run in one scratch directory laid out like a checkout (the commands,
the configs and `../shared` beside it). A command that names a path an earlier one named
(`runs/smollm2`, `results/...`) runs after it, in README order (`eval.py --checkpoint
runs/smollm2` reads what `train.py --workdir runs/smollm2` wrote); chains that share no path run
two at a time, since each command is a process that spends much of its time on one core
(imports, loading, tracing, XLA's compiles). Each `python train.py` / `python eval.py` line gets
flags appended that shrink its work (later flags win in both parsers). Commands that are not run
here are listed in SKIPPED, each with its reason, and reported as skipped tests with it. Python
blocks run in order in one namespace. A block of another language, a command with neither a
rule nor a reason, or a SKIPPED entry that no command matches fails the test.
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

SHELL = ("bash", "sh")
_SHARDS = (
    "the reader's own corpus (corpus/, held_out.jsonl, and /data/shards/code, which no README "
    "command writes); tests/prepare_data_test.py runs prepare_data.py on generated files and "
    "tests/train_shards_test.py trains on its shards"
)
_MULTIHOST = (
    "needs several hosts (SLURM, MPI or a list of them) and OPT-2.7B; tests/multihost_test.py "
    "runs train.py --multihost as two processes on one machine"
)
# Commands the README shows but this test does not run, by their first words, with the reason.
SKIPPED = {
    "make demo": "train.py on the embedded default, which `python train.py --workdir "
    "runs/smollm2` runs here with small limits (make adds only the .venv set-up)",
    "make test": "the test suite itself",
    "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m pytest": "the test suite itself",
    ".ci/py312": "the test suite on Python 3.12 venvs (CI runs it)",
    "bash bench/gpu_check.sh": "needs a GPU; tests/gpu_check_test.py runs its CPU mode",
    "llama-cli": "llama.cpp's own binary, not installed here; tests/export_gguf_test.py runs "
    "the exported files in llama.cpp (llama-cpp-python)",
    "python prepare_data.py": _SHARDS,
    "python train.py --workdir runs/web --config.data.name=shards": _SHARDS,
    "python train.py --workdir runs/mix --config.data.name=shards": _SHARDS,
    "srun ": _MULTIHOST,
    "mpirun ": _MULTIHOST,
    "python train.py --config configs/opt2.7b_tsld.py --workdir /shared/runs/opt2.7b": _MULTIHOST,
}

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


def _fenced() -> list[tuple[int, str, str]]:
    """Every fenced block of the README, indented ones (in list items) too: (line, language,
    text with the fence's indentation removed)."""
    with open(README) as f:
        text = f.read()
    blocks = []
    for match in re.finditer(r"^( *)```(\S*)\n(.*?)^\1```", text, flags=re.S | re.M):
        indent, language, body = match.groups()
        body = "".join(line[len(indent) :] for line in body.splitlines(keepends=True))
        blocks.append((text.count("\n", 0, match.start()) + 1, language, body))
    return blocks


def _blocks(languages: tuple[str, ...]) -> list[str]:
    return [body for _, language, body in _fenced() if language in languages]


def _commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
        if line:
            commands.append(line)
    return commands


def _skip_reason(command: str) -> str | None:
    return next((why for prefix, why in SKIPPED.items() if command.startswith(prefix)), None)


def _shrunk(command: str) -> str | None:
    """The command with its limits appended; None for a SKIPPED one."""
    if _skip_reason(command):
        return None
    words = shlex.split(command)
    if words[0] == "python" and len(words) > 1 and words[1] in SHRINK:
        return " ".join([sys.executable, *map(shlex.quote, words[1:]), *SHRINK[words[1]]])
    raise AssertionError(f"README command with no rule in tests/readme_test.py: {command}")


def _shell_commands() -> list[str]:
    return [c for block in _blocks(SHELL) for c in _commands(block)]


def test_every_readme_block_is_run_or_skipped_with_a_reason():
    blocks = _fenced()
    for line, language, _ in blocks:
        assert language in (*SHELL, "python"), (
            f"README.md:{line}: a ```{language} block, which this test neither runs nor skips"
        )
    commands = _shell_commands()
    for command in commands:
        _shrunk(command)  # raises for a command with neither a rule nor a reason
    for prefix in SKIPPED:
        assert any(c.startswith(prefix) for c in commands), f"SKIPPED {prefix!r} matches nothing"
    assert len(_blocks(("python",))) >= 2
    assert any(c.startswith("python train.py") for c in commands)
    assert any(c.startswith("python eval.py") for c in commands)
    assert "make demo" in commands and "make test" in commands


@pytest.mark.parametrize(
    "command", [c for c in _shell_commands() if _skip_reason(c)], ids=lambda c: c[:60]
)
def test_readme_command_not_run_here(command):
    pytest.skip(f"README command not run here ({command[:60]}): {_skip_reason(command)}")


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
    commands = [c for c in _shell_commands() if _shrunk(c)]

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
    blocks = _blocks(("python",))
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, README, "exec"), namespace)  # noqa: S102
    assert namespace["logits_BxTxV"].shape[-1] == namespace["model"].spec.vocab_size
    assert (tmp_path / "smollm2_hf" / "config.json").exists()
