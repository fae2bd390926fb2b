"""Tokenize a corpus once: `python prepare_data.py --tokenizer MODEL --input FILES... --output DIR`.

Text (.txt: a document a line), .jsonl, .parquet and .arrow files (a `datasets` dump) and
directories of them become Megatron token shards (.bin/.idx) in DIR with a manifest.json, for
`train.py --config.data.name=shards --config.data.path=DIR` (docs/data.md). An existing Megatron
PREFIX.idx is checked and copied in. Run it again after a kill: finished shards are kept. Exit
status: 0 done, 2 a bad input (one `error: ...` line naming the file).
"""

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tokenizer",
        required=True,
        help="the model whose tokenizer to use: what model.name_or_path takes (a Hugging Face "
        'directory, a .gguf file, "smollm2-135m", "random" for the byte tokenizer, a hub id)',
    )
    parser.add_argument("--input", nargs="+", required=True, help="files and directories")
    parser.add_argument("--output", required=True, help="the shard directory to write")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="tokenizing processes (0: in this process)",
    )
    parser.add_argument("--text-field", default="text", help="jsonl/parquet/arrow text field")
    parser.add_argument(
        "--document",
        choices=("line", "file"),
        default="line",
        help=".txt files: a document a non-empty line, or the whole file",
    )
    parser.add_argument("--dtype", choices=("auto", "uint16", "int32"), default="auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv) -> int:
    args = _parser().parse_args(argv[1:])
    from tsld_jax import cli_errors

    with cli_errors.one_line_errors() as outcome:
        if args.workers < 0:
            raise cli_errors.UsageError(f"--workers must be 0 or more, got {args.workers}")
        from tsld_jax.data import prepare
        from tsld_jax.models import loading

        tokenizer = loading.load_tokenizer(args.tokenizer)
        manifest = prepare.prepare(
            args.input,
            args.output,
            tokenizer,
            args.tokenizer,
            workers=args.workers,
            options=prepare.Options(
                text_field=args.text_field, document=args.document, dtype=args.dtype
            ),
            progress=not args.no_progress,
        )
        print(
            f"{args.output}: {len(manifest['shards'])} shards, {manifest['documents']} "
            f"documents, {manifest['tokens']} tokens"
        )
    return outcome.code


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main(sys.argv))
