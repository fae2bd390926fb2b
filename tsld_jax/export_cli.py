"""The `export.py` command line: a trained run or a model out to llama.cpp, transformers, packed.

    python export.py --checkpoint RUN [--step N] --format gguf-tq2_0 --output model.gguf
    python export.py --model smollm2-135m --quant twn --format gguf-tq1_0 --output m.gguf

Formats: gguf-tq2_0 / gguf-tq1_0 (ternary block linears in llama.cpp's ternary types, see
`models.gguf_export`), gguf-q8_0 / gguf-f16 / gguf-f32 (float; quantized layers
fake-quantized), hf (a transformers directory of the fake-quantized weights, with the
quantization settings under "tsld_quantization" in config.json) and packed
(`quant.export.save_packed`).

Every export is written beside --output under a temporary name and renamed into place once
complete (`atomic.replacing`), so an error, a full disk or a kill leaves the earlier output
whole. --output is never an input (the --model file or directory, the run, the model the run
started from) nor a run's files; an existing one is replaced only with --overwrite.

Every user error prints one `error: ...` line and exits with status 2; SIGTERM, one line and 143.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from tsld_jax import atomic
from tsld_jax.models import gguf_export
from tsld_jax.models.errors import LoadError

FORMATS = (*gguf_export.FORMATS, "hf", "packed")
QUANT_CONFIG_KEY = "tsld_quantization"


class UsageError(ValueError):
    """A flag combination or value that cannot work."""


@dataclasses.dataclass
class Source:
    """A model to export.

    Attributes:
      params: the decoder's parameters (latent weights for a QAT checkpoint).
      spec: the architecture.
      hf_config: its config.json dictionary.
      tokenizer: a Hugging Face tokenizer, `named.ByteTokenizer`, or None.
      rules: the quantization rules (None for a float model).
      gguf_path: the GGUF file it came from, whose tokenizer metadata a GGUF export copies.
      name: how the export names the model.
    """

    params: Any
    spec: Any
    hf_config: dict[str, Any]
    tokenizer: Any
    rules: Any
    gguf_path: str | None
    name: str


def _gguf_path_of(name_or_path: str) -> str | None:
    from tsld_jax.models import loading, named

    if name_or_path == named.RANDOM:
        return None
    path = loading.resolve_path(name_or_path)
    return loading._find_gguf(path) if os.path.exists(path) else None


def _hf_config_of(name_or_path: str, spec) -> dict[str, Any]:
    # The config of the model a run started from, read without loading its weights again.
    from tsld_jax.models import gguf, loading, named

    if name_or_path == named.RANDOM:
        return named.random_hf_config(spec)
    gguf_path = _gguf_path_of(name_or_path)
    if gguf_path:
        return gguf.hf_config_from_gguf(gguf_path)
    with open(os.path.join(loading.resolve_path(name_or_path), "config.json")) as f:
        return json.load(f)


def load_source(args: argparse.Namespace) -> Source:
    """The model that --checkpoint or --model (with --quant) names."""
    from tsld_jax import recipe

    if args.checkpoint:
        from tsld_jax import checkpoint, workdir

        try:
            restored = checkpoint.restore_for_eval(args.checkpoint, args.step)
        except (FileNotFoundError, ValueError, KeyError, workdir.WorkdirError) as error:
            raise LoadError(f"--checkpoint {args.checkpoint}: {error}") from None
        config = restored["config"]
        origin = config.model.name_or_path
        return Source(
            params=restored["params"],
            spec=restored["spec"],
            hf_config=_hf_config_of(origin, restored["spec"]),
            tokenizer=restored.get("tokenizer"),
            rules=recipe.quant_rules(config),
            gguf_path=_gguf_path_of(origin),
            name=f"{os.path.basename(os.path.abspath(args.checkpoint))}@{restored['step']}",
        )
    return model_source(args.model, args.quant)


def model_source(name_or_path: str, quant: str | None = None) -> Source:
    """A model by name or path (as `load_model` takes it), with a --quant preset or float."""
    from tsld_jax.models import load_model, loading
    from tsld_jax.quant import rules as rules_lib

    # A model folder without a tokenizer still exports (the weights are the user's); the
    # formats that need a tokenizer (GGUF) say so, the others are written without one.
    loaded = load_model(name_or_path, load_tokenizer=not loading.tokenizer_missing(name_or_path))
    rules = None
    if quant:
        try:
            rules = rules_lib.preset_rules(quant)
            rules_lib.resolve(loaded.params, rules)
        except ValueError as error:
            raise UsageError(f"--quant {quant}: {error}") from None
    return Source(
        params=loaded.params,
        spec=loaded.spec,
        hf_config=dict(loaded.hf_config),
        tokenizer=loaded.tokenizer,
        rules=rules,
        gguf_path=_gguf_path_of(name_or_path),
        name=os.path.basename(os.path.normpath(name_or_path)) + (f"+{quant}" if quant else ""),
    )


def _vocab(source: Source) -> gguf_export.Vocab:
    from tsld_jax.models import named

    if source.gguf_path:
        return gguf_export.vocab_from_gguf(source.gguf_path)
    if isinstance(source.tokenizer, named.ByteTokenizer):
        return gguf_export.vocab_from_bytes(source.spec.vocab_size)
    if source.tokenizer is None:
        raise UsageError("the model has no tokenizer, and llama.cpp needs one in the GGUF file")
    return gguf_export.vocab_from_tokenizer(source.tokenizer, source.spec.vocab_size)


def quantization_settings(rules: Sequence[tuple[str, Any]] | None) -> dict[str, Any] | None:
    """The rules as JSON: [[path regex, {method, bits, granularity, group_size} or null], ...]."""
    if rules is None:
        return None
    return {
        "fake_quantized": True,
        "rules": [
            [pattern, dataclasses.asdict(spec) if spec is not None else None]
            for pattern, spec in rules
        ],
    }


def _export_hf(source: Source, path: str) -> str:
    from tsld_jax.models import hf, named
    from tsld_jax.quant import rules as rules_lib

    params = source.params
    if source.rules is not None:
        params = rules_lib.quantize_params(params, source.rules)
    config = dict(source.hf_config)
    settings = quantization_settings(source.rules)
    if settings is not None:
        config[QUANT_CONFIG_KEY] = settings
    tokenizer = source.tokenizer
    has_files = tokenizer is not None and not isinstance(tokenizer, named.ByteTokenizer)
    hf.save_hf(path, params, source.spec, config, tokenizer if has_files else None)
    note = (
        ""
        if has_files
        else " (no tokenizer files: the model uses a byte tokenizer)"
        if tokenizer is not None
        else " (no tokenizer files: the source model has none)"
    )
    return f"transformers directory of the fake-quantized weights{note}"


def _export_packed(source: Source, path: str) -> str:
    from tsld_jax.quant import export

    if source.rules is None:
        raise UsageError("--format packed needs quantized weights: a QAT checkpoint or --quant")
    packed = export.export_packed(source.params, source.rules)
    export.save_packed(path, packed, source.spec, source.tokenizer)
    sizes = export.weight_bytes(packed)
    return (
        f"packed model, {sizes['packed_model']:,} bytes of weights "
        f"({sizes['bf16_model']:,} in bf16)"
    )


def _export_gguf(source: Source, fmt: str, path: str) -> gguf_export.ExportReport:
    gguf_export.check_supported(source.spec)
    return gguf_export.write_gguf(
        path,
        source.params,
        source.spec,
        fmt=fmt,
        vocab=_vocab(source),
        hf_config=source.hf_config,
        rules=source.rules,
        name=source.name,
    )


def export(source: Source, fmt: str, output: str) -> str:
    """Writes `source` in `fmt` to `output`, replacing what is there; returns the report to print.

    The export is written beside `output` under a temporary name and renamed into place once
    complete (`atomic.replacing`; an hf directory is swapped in whole), so an error, a full disk
    or a kill midway leaves the earlier output, byte for byte, and no partial one. Whether an
    existing output may be replaced at all is the command line's decision (`check_output`).
    """
    with atomic.replacing(output, directory=fmt == "hf") as path:
        if fmt == "hf":
            what = _export_hf(source, path)
        elif fmt == "packed":
            what = _export_packed(source, path)
        else:
            report = _export_gguf(source, fmt, path)
    if fmt in ("hf", "packed"):
        return f"wrote {output}: {what}"
    return dataclasses.replace(report, path=os.path.abspath(output)).summary()


class _Parser(argparse.ArgumentParser):
    # argparse prints its usage and exits on a bad flag; we want the one-line error instead.
    def error(self, message: str):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="export.py", description="Export a trained run or a model for deployment."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a train.py workdir (its newest readable step)")
    source.add_argument(
        "--model", help="HF directory, .gguf file, hub id, or smollm2-135m (float weights)"
    )
    parser.add_argument("--step", type=int, help="the checkpointed step of --checkpoint")
    parser.add_argument(
        "--quant", help="post-training quantization preset for --model (twn, pact2, ...)"
    )
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--output", required=True, help="the file (GGUF, packed) or directory (hf)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --output (never an input, a model's files or a run's)",
    )
    return parser


# What a train.py workdir holds that no export may replace: what eval.py and a resume read
# (config.json, checkpoints/, the teacher's sampled data) and the run's own records.
_RUN_ENTRIES = ("config.json", "checkpoints", "train.lock", "metrics.jsonl", "results.json")


def _is_run_entry(name: str) -> bool:
    return name in _RUN_ENTRIES or (name.startswith("generated_") and name.endswith(".npz"))


def _run_config(directory: str) -> dict[str, Any] | None:
    """The train.py config in `directory`/config.json (one with a `model` section), or None."""
    try:
        with open(os.path.join(directory, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and isinstance(config.get("model"), dict) else None


def _is_run(directory: str) -> bool:
    return os.path.isdir(os.path.join(directory, "checkpoints")) or bool(_run_config(directory))


def _inputs(args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    """(real path, its description, whether it is a run) of each local file or directory the
    export reads."""
    if args.model:
        if not os.path.exists(args.model):  # a model name or hub id, outside the user's folders
            return []
        real = os.path.realpath(args.model)
        what = "the source model's directory" if os.path.isdir(real) else "the input file"
        return [(real, f"{what} (--model {args.model})", False)]
    found = [(os.path.realpath(args.checkpoint), f"the run --checkpoint {args.checkpoint}", True)]
    origin = ((_run_config(args.checkpoint) or {}).get("model") or {}).get("name_or_path")
    if isinstance(origin, str) and os.path.exists(origin):
        what = f"the model the run started from ({origin})"
        found.append((os.path.realpath(origin), what, False))
    return found


def _inside(path: str, directory: str) -> bool:
    return path.startswith(directory.rstrip(os.sep) + os.sep)


def _run_holding(path: str) -> str | None:
    """The run directory whose config, checkpoints or records `path` is (or is inside), if any."""
    folder = os.path.dirname(path)
    while True:
        if _is_run(folder) and _is_run_entry(os.path.relpath(path, folder).split(os.sep)[0]):
            return folder
        if os.path.dirname(folder) == folder:
            return None
        folder = os.path.dirname(folder)


def check_output(args: argparse.Namespace) -> None:
    """Refuses an --output that would replace an input or a run, is the wrong kind (a file for
    hf, a directory for the others), or exists without --overwrite. Paths are compared after
    resolving links and `..`.

    Refused whatever the flags: the input file; the source model's directory, anything already
    in it, or a folder holding it; a run's workdir, its config.json, checkpoints/ and records
    (of the exported run or any other). Needing --overwrite: an existing file, or a non-empty
    directory with a config.json (an earlier hf export); a non-empty directory without one is
    not an export and is never replaced (an hf export replaces the whole directory).

    Raises:
      UsageError: naming --output.
    """
    output = args.output
    real = os.path.realpath(output)
    for path, what, is_run in _inputs(args):
        if real == path:
            raise UsageError(f"--output {output} is {what}; write the export elsewhere")
        if _inside(path, real):
            raise UsageError(f"--output {output} holds {what}; write the export elsewhere")
        # Inside a run, only its own files are refused (below): an earlier export may be replaced.
        if not is_run and _inside(real, path) and os.path.lexists(real):
            raise UsageError(
                f"--output {output} would replace a file of {what}; write the export elsewhere"
            )
    if os.path.isdir(real) and _is_run(real):
        raise UsageError(f"--output {output} holds a train.py run; write the export elsewhere")
    run = _run_holding(real)
    if run is not None:
        raise UsageError(
            f"--output {output} is part of the train.py run {run}; write the export elsewhere"
        )
    if args.format == "hf" and os.path.isfile(real):
        raise UsageError(f"--output {output}: --format hf writes a directory, this is a file")
    if args.format != "hf" and os.path.isdir(real):
        raise UsageError(f"--output {output}: is a directory; --format {args.format} writes a file")
    if os.path.isdir(real):
        if not os.listdir(real):
            return  # an empty folder made for the export: nothing to lose
        if not os.path.isfile(os.path.join(real, "config.json")):
            raise UsageError(
                f"--output {output} is a directory that is not a model (no config.json); "
                "an hf export replaces its whole --output, so name a new or empty directory"
            )
    if os.path.lexists(output) and not args.overwrite:
        raise UsageError(f"--output {output} exists; pass --overwrite to replace it")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.step is not None and not args.checkpoint:
        raise UsageError("--step applies to --checkpoint")
    if args.quant and not args.model:
        raise UsageError("--quant applies to --model; a checkpoint keeps its own quantization")
    if args.model and not args.quant and args.format in (*gguf_export.TERNARY_FORMATS, "packed"):
        raise UsageError(f"--format {args.format} needs ternary weights: add --quant twn")
    if args.checkpoint and not os.path.isdir(args.checkpoint):
        raise UsageError(f"--checkpoint {args.checkpoint}: no such directory")
    parent = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(parent):
        raise UsageError(f"--output {args.output}: the directory {parent} does not exist")
    check_output(args)
    return args


def _identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of what is at `path`, or None: a rename onto it changes them."""
    try:
        stat = os.lstat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


class _Stopped(BaseException):
    # Not an Exception, so that no `except Exception` inside a writer catches it: it must unwind
    # to `atomic.replacing`, which removes the temporary, and then to `main`.
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame: Any) -> None:
    raise _Stopped(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (2 for every user error, 128 + N when
    stopped by signal N)."""
    from tsld_jax import cli_errors

    try:
        args = _parse(sys.argv[1:] if argv is None else argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    errors = (UsageError, gguf_export.ExportError, *cli_errors.user_error_types())
    existed = os.path.lexists(args.output)
    earlier = _identity(args.output)
    kept = " (the earlier one there is unchanged)" if existed else ""
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        source = load_source(args)
        try:
            try:
                print(export(source, args.format, args.output))
            except Exception as error:
                # safetensors (Rust) reports a full disk as a SafetensorError "(os error 28)".
                failure = atomic.os_error_in(error, args.output)
                if failure is None or isinstance(error, OSError):
                    raise
                raise failure from None
        except OSError as error:
            # The place or the disk failed while writing (full, read-only, permission denied);
            # `atomic.replacing` has removed the partial export.
            where = f" ({error.filename})" if error.filename else ""
            print(
                f"error: --output {args.output}: {error.strerror or error}{where}; "
                f"nothing was written{kept}",
                file=sys.stderr,
            )
            # A full disk is the machine (exit 1); a read-only or forbidden place, the input.
            return 1 if error.errno in (errno.ENOSPC, errno.EDQUOT) else 2
    except errors as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; {args.output} was not written{kept}", file=sys.stderr)
        return 130
    except _Stopped as stopped:
        name = signal.Signals(stopped.signum).name
        if _identity(args.output) != earlier:
            # The signal came after the rename (while the directory was synced): it is whole.
            print(
                f"error: stopped by {name} after {args.output} was written (it is complete)",
                file=sys.stderr,
            )
        else:
            print(f"error: stopped by {name}; {args.output} was not written{kept}", file=sys.stderr)
        return 128 + stopped.signum
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
