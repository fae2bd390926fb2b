"""The `eval.py` command line: load a model, run the tasks, print and write the results.

Model sources (exactly one): `--model` (HF directory, hub id or GGUF file), `--checkpoint`
(a train.py workdir, restored with the quantization it was trained with) or `--packed` (a
packed-weight file from `quant.export.save_packed`, with `--tokenizer`). `--quant` applies
post-training quantization to a `--model`.

Every user error (bad flag values, unknown task, missing or malformed data, unloadable model)
prints one `error: ...` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from tsld_jax.data.sources import DataError
from tsld_jax.evaluation import choice, gsm8k, perplexity
from tsld_jax.models import LoadError, load_model

# Context length when the model's config names none (the harness's default).
DEFAULT_MAX_LENGTH = 2048
_LENGTH_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx")


class UsageError(ValueError):
    """A flag combination or value that cannot work."""


@dataclasses.dataclass
class EvalModel:
    """What every task runner needs.

    Attributes:
      params: decoder parameters.
      spec: the architecture.
      tokenizer: a Hugging Face tokenizer.
      quantizer: `quantizer(name, layer_params) -> kernel` for every linear(), or None.
      name: how results name the model.
      max_length: the context length (the harness's max_length).
      last_eval: the training run's last held-out evaluation (--checkpoint only).
    """

    params: Any
    spec: Any
    tokenizer: Any
    quantizer: Callable | None
    name: str
    max_length: int = DEFAULT_MAX_LENGTH
    last_eval: dict[str, Any] | None = None


# A task runner takes (model, parsed args, task name) and returns a results dict.
TaskRunner = Callable[[EvalModel, argparse.Namespace, str], dict[str, Any]]


def _run_perplexity(model: EvalModel, args: argparse.Namespace, task: str) -> dict[str, Any]:
    limits = [n for n in (args.max_blocks, args.limit) if n is not None]
    max_blocks = min(limits) if limits else None  # --limit N counts blocks here
    return perplexity.run(
        model.params,
        model.spec,
        model.tokenizer,
        task=task,
        split=args.split or "validation",
        data_dir=args.data_dir,
        block_size=args.block_size,
        max_blocks=max_blocks,
        batch_size=args.batch_size or 4,
        quantizer=model.quantizer,
        progress=not args.quiet,
        bos=args.bos,
    )


def _run_choice(model: EvalModel, args: argparse.Namespace, task: str) -> dict[str, Any]:
    return choice.run(
        model.params,
        model.spec,
        model.tokenizer,
        task=task,
        split=args.split,
        data_dir=args.data_dir,
        limit=args.limit,
        batch_size=args.batch_size or 8,
        max_length=model.max_length,
        quantizer=model.quantizer,
        progress=not args.quiet,
    )


def _run_gsm8k(model: EvalModel, args: argparse.Namespace, task: str) -> dict[str, Any]:
    return gsm8k.run(
        model.params,
        model.spec,
        model.tokenizer,
        split=args.split,
        data_dir=args.data_dir,
        limit=args.limit,
        num_fewshot=gsm8k.DEFAULT_FEWSHOT if args.num_fewshot is None else args.num_fewshot,
        batch_size=args.batch_size or 8,
        max_new_tokens=args.max_gen_toks,
        max_length=model.max_length,
        quantizer=model.quantizer,
        progress=not args.quiet,
        keep_samples=args.log_samples,
    )


TASKS: dict[str, TaskRunner] = {
    "ptb": _run_perplexity,
    "wikitext2": _run_perplexity,
    **{name: _run_choice for name in choice.TASKS},
    "gsm8k": _run_gsm8k,
}


# ------------------------------------------------------------------------------------- models


def _max_length(hf_config: dict[str, Any] | None, tokenizer: Any, spec: Any) -> int:
    """As the harness: the config's n_positions/max_position_embeddings/n_ctx, else the
    tokenizer's model_max_length when it is a real limit, else 2048."""
    for field in _LENGTH_FIELDS:
        if hf_config and hf_config.get(field):
            return int(hf_config[field])
    if spec.positional == "learned" and spec.max_positions:
        return spec.max_positions - spec.position_offset
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return DEFAULT_MAX_LENGTH


def _quantized(params: Any, preset: str) -> Any:
    from tsld_jax import quant

    try:
        return quant.quantize_params(params, quant.preset_rules(preset))
    except ValueError as error:
        raise UsageError(f"--quant {preset}: {error}") from None


def load_eval_model(args: argparse.Namespace) -> EvalModel:
    """Builds the EvalModel from --model / --checkpoint / --packed (and --quant).

    Raises:
      LoadError, UsageError, DataError: with one-line messages.
    """
    if args.checkpoint:
        from tsld_jax import checkpoint, workdir

        try:
            restored = checkpoint.restore_for_eval(args.checkpoint, args.step)
        except (FileNotFoundError, ValueError, KeyError, workdir.WorkdirError) as error:
            raise LoadError(f"--checkpoint {args.checkpoint}: {error}") from None
        except AttributeError as error:  # e.g. a HF model directory: its config.json is not ours
            raise LoadError(
                f"--checkpoint {args.checkpoint}: its config.json is not a train.py config "
                f"(no field {str(error).strip(chr(34) + chr(39))!r}); pass a train.py workdir, "
                "or use --model for a model folder"
            ) from None
        if restored.get("tokenizer") is None:
            raise LoadError(f"--checkpoint {args.checkpoint}: the run has no tokenizer")
        name = f"{args.checkpoint}@{restored.get('step')}"
        model = EvalModel(
            params=restored["params"],
            spec=restored["spec"],
            tokenizer=restored["tokenizer"],
            quantizer=restored.get("quantizer"),
            name=name,
            last_eval=restored.get("last_eval"),
        )
        model.max_length = args.max_length or _max_length(None, model.tokenizer, model.spec)
        return model
    if args.packed:
        from tsld_jax.quant import export

        try:
            packed = export.load_packed(args.packed)
            exported_with = export.packed_tokenizer(args.packed)
        except (FileNotFoundError, ValueError, KeyError, OSError) as error:
            raise LoadError(f"--packed {args.packed}: {error}") from None
        if packed.spec is None:
            raise LoadError(f"--packed {args.packed}: the file holds no model spec")
        tokenizer = load_tokenizer(args.tokenizer)
        _check_packed_tokenizer(args, exported_with, export.tokenizer_identity(tokenizer))
        return EvalModel(
            params=packed.params,
            spec=packed.spec,
            tokenizer=tokenizer,
            quantizer=None,
            name=args.packed,
            max_length=args.max_length or _max_length(None, tokenizer, packed.spec),
        )
    loaded = load_model(args.model)
    model = _from_loaded(loaded, args.model, args)
    if args.quant:
        model.params = _quantized(model.params, args.quant)
        model.name = f"{args.model}+{args.quant}"
    return model


def _check_packed_tokenizer(args: argparse.Namespace, exported_with: Any, given: Any) -> None:
    # A file from before packed files carried the identity (or exported without a tokenizer)
    # has none: only check_model's size test applies to it.
    if exported_with is None or given is None or exported_with == given:
        return
    raise UsageError(
        f"--tokenizer {args.tokenizer} ({given}) is not the tokenizer --packed {args.packed} "
        f"was exported with ({exported_with}); pass that one"
    )


def _tokenizer_size(tokenizer: Any) -> int | None:
    try:
        return len(tokenizer)  # HF tokenizers: the base vocabulary plus added tokens
    except TypeError:
        return getattr(tokenizer, "vocab_size", None)


def check_model(model: EvalModel, args: argparse.Namespace, tasks: Sequence[str]) -> None:
    """What a loaded model cannot do, found before anything is compiled.

    Raises:
      UsageError: a tokenizer whose ids run past the model's embedding (gathers would clamp:
        silently wrong scores), or a length past a learned position table (NaN perplexities).
    """
    vocab, size = model.spec.vocab_size, _tokenizer_size(model.tokenizer)
    # Embeddings are often padded past the tokenizer (OPT: 50265 tokens, 50272 rows; Qwen:
    # 151665 and 151936), so only a tokenizer larger than the model, or far smaller, is wrong.
    if size is not None and (size > vocab or size < vocab - max(256, vocab // 100)):
        source = f"--tokenizer {args.tokenizer}" if args.tokenizer else "the tokenizer"
        raise UsageError(
            f"{source} has {size} tokens but the model {model.name} has a vocabulary of {vocab}: "
            "they do not belong together"
        )
    limit = model.spec.position_limit
    if limit is None:
        return
    if args.max_length is not None and args.max_length > limit:
        raise UsageError(
            f"--max-length {args.max_length} is longer than the model's {limit} positions"
        )
    if any(TASKS[task] is _run_perplexity for task in tasks) and args.block_size > limit:
        raise UsageError(
            f"--block-size {args.block_size} is longer than the model's {limit} positions"
        )


def check_output(path: str | None) -> None:
    """Makes sure results can be written to `path` before any work: creates missing folders,
    refuses a directory or an unwritable place.

    Raises:
      UsageError: naming --output.
    """
    if not path:
        return
    if os.path.isdir(path):
        raise UsageError(f"--output {path} is a directory; name a file")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        # A real write, not os.access: as root, access() says yes to a read-only file system.
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".eval-output-", delete=True)
        probe.close()
        if os.path.exists(path):
            with open(path, "a"):
                pass
    except OSError as error:
        raise UsageError(
            f"--output {path}: cannot write there ({error.strerror or error})"
        ) from None


def write_output(path: str, payload: Any) -> None:
    """Writes the results JSON atomically (`atomic.replacing`: an earlier file at `path` stays
    whole until the new one is complete, and a failed write leaves no temporary behind)."""
    from tsld_jax import atomic

    atomic.write_json(path, payload, indent=2)


def load_tokenizer(name_or_path: str) -> Any:
    """The tokenizer of a HF model directory or hub id, or the one in a GGUF file's metadata."""
    from tsld_jax.models import gguf, loading

    path = loading.resolve_path(name_or_path)
    if path.endswith(".gguf") and os.path.isfile(path):
        return gguf.load_tokenizer(path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as error:  # transformers raises OSError, ValueError, EnvironmentError...
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LoadError(f"--tokenizer {name_or_path}: cannot load a tokenizer ({first})") from None


def _from_loaded(loaded: Any, name: str, args: argparse.Namespace) -> EvalModel:
    """An EvalModel from a LoadedModel-like object (params, spec, tokenizer[, hf_config,
    quantizer])."""
    hf_config = getattr(loaded, "hf_config", None)
    tokenizer = loaded.tokenizer
    return EvalModel(
        params=loaded.params,
        spec=loaded.spec,
        tokenizer=tokenizer,
        quantizer=getattr(loaded, "quantizer", None),
        name=name,
        max_length=args.max_length or _max_length(hf_config, tokenizer, loaded.spec),
    )


# ------------------------------------------------------------------------------------ output


def _rows(result: dict[str, Any]) -> list[tuple[str, str, str, Any, Any, Any]]:
    """(task, split, metric, value, stderr, n) rows of one result."""
    if "ppl" in result:
        return [(result["task"], result["split"], "ppl", result["ppl"], None, result["blocks"])]
    rows = []
    for key, value in result.items():
        if key.endswith("_stderr") or not isinstance(value, float):
            continue
        rows.append(
            (result["task"], result["split"], key, value, result.get(f"{key}_stderr"), result["n"])
        )
    return rows


def results_table(results: Sequence[dict[str, Any]]) -> str:
    """The results as a fixed-width table (task, split, metric, value, stderr, n)."""
    header = ("task", "split", "metric", "value", "stderr", "n")
    lines = [header]
    for result in results:
        for task, split, metric, value, stderr, n in _rows(result):
            lines.append(
                (
                    task,
                    split,
                    metric,
                    f"{value:.4f}",
                    "-" if stderr is None else f"{stderr:.4f}",
                    str(n),
                )
            )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = []
    for number, row in enumerate(lines):
        cells = [
            cell.ljust(width) if i < 3 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
        if number == 0:
            out.append("  ".join("-" * width for width in widths))
    return "\n".join(out)


def _summary(result: dict[str, Any]) -> str:
    if "ppl" in result:
        return (
            f"{result['task']} {result['split']}: ppl {result['ppl']:.4f} "
            f"({result['blocks']} blocks, {result['tokens']} tokens) model={result['model']}"
        )
    metrics = ", ".join(
        f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float) and "stderr" not in k
    )
    return (
        f"{result['task']} {result['split']}: {metrics} (n={result['n']}) model={result['model']}"
    )


# ------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The eval.py argument parser."""
    parser = argparse.ArgumentParser(
        prog="eval.py",
        description="Evaluate a decoder model: perplexity, multiple choice and GSM8K, scored "
        "as lm-evaluation-harness 0.4 does.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="HF model directory, hub id, or .gguf file")
    source.add_argument("--checkpoint", help="a train.py workdir (its newest checkpoint)")
    source.add_argument(
        "--packed",
        help="a packed quantized model file (quant.export.save_packed); needs --tokenizer",
    )
    parser.add_argument(
        "--tokenizer", default=None, help="HF directory, hub id or .gguf (--packed)"
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (--checkpoint)")
    parser.add_argument(
        "--quant",
        choices=("twn", "asym4", "sym8"),
        default=None,
        help="post-training quantization of --model's block linears",
    )
    parser.add_argument("--task", required=True, help=f"comma-separated tasks: {', '.join(TASKS)}")
    parser.add_argument(
        "--split", default=None, help="data split (default: the task's evaluation split)"
    )
    parser.add_argument("--data-dir", default=None, help="local data laid out like shared/data")
    parser.add_argument(
        "--limit", type=int, default=None, help="only the first N questions (N blocks for ppl)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default: 4 (ppl), 8 (others)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="gsm8k: 5, or 0 (zero-shot)")
    parser.add_argument("--max-gen-toks", type=int, default=gsm8k.MAX_GEN_TOKS)
    parser.add_argument("--max-length", type=int, default=None, help="override the context length")
    parser.add_argument("--block-size", type=int, default=512, help="perplexity block length")
    parser.add_argument("--max-blocks", type=int, default=None, help="perplexity: first N blocks")
    parser.add_argument(
        "--bos",
        choices=perplexity.BOS_MODES,
        default="line",
        help="perplexity: 'line' (the authors' protocol: each line with the tokenizer's "
        "defaults) or 'block' (a BOS per block, lines as plain text: Gemma)",
    )
    parser.add_argument("--log-samples", type=int, default=0, help="gsm8k: keep N generations")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def check_args(args: argparse.Namespace) -> list[str]:
    """Validates the flags before anything is loaded; returns the task list.

    Raises:
      UsageError: naming the flag.
    """
    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise UsageError(
            f"unknown task {unknown[0] if unknown else args.task!r}; known: {', '.join(TASKS)}"
        )
    for flag, value, minimum in (
        ("--limit", args.limit, 1),
        ("--batch-size", args.batch_size, 1),
        ("--num-fewshot", args.num_fewshot, 0),
        ("--max-gen-toks", args.max_gen_toks, 1),
        ("--max-length", args.max_length, 2),
        ("--step", args.step, 0),
        ("--max-blocks", args.max_blocks, 1),
        ("--log-samples", args.log_samples, 0),
    ):
        if value is not None and value < minimum:
            raise UsageError(f"{flag} must be at least {minimum}, got {value}")
    if args.step is not None and not args.checkpoint:
        raise UsageError("--step needs --checkpoint")
    if bool(args.packed) != bool(args.tokenizer):
        raise UsageError("--packed needs --tokenizer (and --tokenizer is only for --packed)")
    if args.quant and not args.model:
        raise UsageError(
            "--quant applies to --model; a --checkpoint or --packed model is evaluated with "
            "the quantization it already has"
        )
    if args.num_fewshot and "gsm8k" not in tasks:
        raise UsageError("--num-fewshot applies to gsm8k only (the other tasks are zero-shot)")
    return tasks


def main(argv: Sequence[str] | None = None) -> int:
    """Runs eval.py; returns the process exit code (2 for user errors)."""
    args = build_parser().parse_args(argv)
    try:
        tasks = check_args(args)
        check_output(args.output)
        model = load_eval_model(args)
        check_model(model, args, tasks)
        results = []
        for task in tasks:
            start = time.perf_counter()
            result = TASKS[task](model, args, task)
            result["model"] = model.name
            if model.last_eval is not None:
                result["train_last_eval"] = model.last_eval
            result["seconds"] = round(time.perf_counter() - start, 3)
            print(_summary(result))
            results.append(result)
    except (LoadError, DataError, UsageError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print()
    print(results_table(results))
    if args.output:
        payload = results[0] if len(results) == 1 else {"model": model.name, "results": results}
        try:
            write_output(args.output, payload)
        except OSError as error:
            # Checked at the start, but the place may have changed since: the results are not
            # lost, they go to stdout.
            print(json.dumps(payload, indent=2))
            print(
                f"error: --output {args.output}: cannot write ({error.strerror or error}); "
                "the results JSON is on stdout above",
                file=sys.stderr,
            )
            # A full disk is the machine (exit 1); a place that turned read-only, the input.
            return 1 if error.errno in (errno.ENOSPC, errno.EDQUOT) else 2
    return 0
