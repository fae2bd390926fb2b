"""The `eval.py` command line: load a model, run the tasks, print and write the results."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from tsld_jax.evaluation import perplexity
from tsld_jax.models import LoadError, load_model

# A task runner takes (loaded model, parsed args, task name) and returns a results dict.
TaskRunner = Callable[[Any, argparse.Namespace, str], dict[str, Any]]


def _run_perplexity(model, args: argparse.Namespace, task: str) -> dict[str, Any]:
    return perplexity.run(
        model.params,
        model.spec,
        model.tokenizer,
        task=task,
        split=args.split,
        data_dir=args.data_dir,
        block_size=args.block_size,
        max_blocks=args.max_blocks,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )


TASKS: dict[str, TaskRunner] = {"ptb": _run_perplexity, "wikitext2": _run_perplexity}


def _summary(result: dict[str, Any]) -> str:
    if "ppl" in result:
        return (
            f"{result['task']} {result['split']}: ppl {result['ppl']:.4f} "
            f"({result['blocks']} blocks, {result['tokens']} tokens) model={result['model']}"
        )
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))
    return f"{result['task']}: {metrics} model={result['model']}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eval.py", description="Evaluate a decoder model (perplexity and downstream tasks)."
    )
    parser.add_argument("--model", required=True, help="HF model directory, hub id, or .gguf file")
    parser.add_argument("--task", required=True, help=f"comma-separated tasks: {', '.join(TASKS)}")
    parser.add_argument("--split", default="validation", help="validation (default), test, train")
    parser.add_argument("--data-dir", default=None, help="local data laid out like shared/data")
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--max-blocks", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs eval.py; returns the process exit code (2 for user errors)."""
    args = build_parser().parse_args(argv)
    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        print(f"error: unknown task {unknown or args.task!r}; known: {', '.join(TASKS)}",
              file=sys.stderr)
        return 2
    try:
        model = load_model(args.model)
        results = []
        for task in tasks:
            start = time.perf_counter()
            result = TASKS[task](model, args, task)
            result["model"] = args.model
            result["seconds"] = round(time.perf_counter() - start, 3)
            print(_summary(result))
            results.append(result)
    except (LoadError, perplexity.DataError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.output:
        payload = results[0] if len(results) == 1 else {"model": args.model, "results": results}
        with open(args.output, "w") as f:
            json.dump(payload, f, indent=2)
    return 0
