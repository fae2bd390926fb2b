"""lm-evaluation-harness model `tsld-jax`: our JAX decoder behind the harness's LM API.

    python -m tsld_jax.lm_eval_model --model tsld-jax \\
        --model_args path=smollm2-135m,quant=twn --tasks arc_easy

lm-eval 0.4.13 finds models only in its own registry (no entry-point group is read), so the
class registers itself when this module is imported; `python -m tsld_jax.lm_eval_model` is
the harness's own command line (`lm_eval ...`, same flags) with that import done first. From
Python, `import tsld_jax.lm_eval_model` before `lm_eval.simple_evaluate(model="tsld-jax")`.

model_args (exactly one source; the same loader as eval.py, so the same model):
  path=NAME_OR_DIR[,quant=twn|asym4|sym8]   a model name, HF directory or .gguf (eval.py --model)
  checkpoint=WORKDIR[,step=N]               a train.py run (eval.py --checkpoint)
  packed=FILE,tokenizer=NAME_OR_DIR         a packed model (eval.py --packed)
  max_length=N, batch_size=N, max_gen_toks=N, prefix_token_id=N (empty contexts and rolling
  windows start from it; default BOS, else EOS, as HFLM)

Requests are scored by our own scorers: `loglikelihood` by `choice.encode_pair` and
`choice.loglikelihoods` (as eval.py's multiple-choice tasks), `loglikelihood_rolling` by the
harness's rolling windows scored with `choice.loglikelihoods`, `generate_until` by
`generate.generate_text`. Offline task definitions for ARC and PIQA live in
`tsld_jax/lm_eval_tasks` (pass it with --include_path).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from tsld_jax import generate
from tsld_jax.evaluation import choice, cli

# The harness's task definitions that read shared/data, for --include_path.
TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")


def _optional_int(value: Any) -> int | None:
    return None if value in (None, "", "None") else int(value)


@register_model("tsld-jax")
class TsldJaxLM(LM):
    """The harness's LM interface over an eval.py model (float, fake-quantized, packed, or a
    checkpoint)."""

    def __init__(
        self,
        path: str | None = None,
        quant: str | None = None,
        checkpoint: str | None = None,
        step: int | None = None,
        packed: str | None = None,
        tokenizer: str | None = None,
        batch_size: int | str | None = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        prefix_token_id: int | None = None,
        **unused: Any,  # device, dtype, ...: the harness passes them to every model
    ) -> None:
        super().__init__()
        sources = [
            name
            for name, value in (("path", path), ("checkpoint", checkpoint), ("packed", packed))
            if value
        ]
        if len(sources) != 1:
            raise ValueError(
                "tsld-jax: give exactly one of path=, checkpoint=, packed= in --model_args "
                f"(got {sources or 'none'})"
            )
        args = argparse.Namespace(
            model=path,
            checkpoint=checkpoint,
            step=_optional_int(step),
            packed=packed,
            tokenizer=tokenizer,
            quant=quant or None,
            max_length=_optional_int(max_length),
            block_size=512,
        )
        if args.quant and not path:
            raise ValueError("tsld-jax: quant= applies to path= (as eval.py's --quant)")
        if args.quant not in (None, "twn", "asym4", "sym8"):
            raise ValueError(f"tsld-jax: quant={quant}; expected twn, asym4 or sym8")
        self.model = cli.load_eval_model(args)
        cli.check_model(self.model, args, [])
        # "auto" (the harness's adaptive batch size) falls back to our default.
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size or 8)
        self.max_length = self.model.max_length
        self.max_gen_toks = int(max_gen_toks)
        tok = self.model.tokenizer
        self.eot_token_id = tok.eos_token_id
        # As HFLM.prefix_token_id: the one given, else BOS when the tokenizer has one, else EOS.
        bos = getattr(tok, "bos_token_id", None)
        self.prefix_token_id = _optional_int(prefix_token_id)
        if self.prefix_token_id is None:
            self.prefix_token_id = bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.model.tokenizer, "name_or_path", self.model.name).replace("/", "__")

    def _encode(self, text: str) -> list[int]:
        return list(self.model.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _score(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        loglik, greedy = choice.loglikelihoods(
            self.model.params,
            self.model.spec,
            requests,
            batch_size=self.batch_size,
            max_length=self.max_length,
            quantizer=self.model.quantizer,
        )
        return [(float(value), bool(hit)) for value, hit in zip(loglik, greedy, strict=True)]

    def _prefix(self) -> int:
        if self.prefix_token_id is None:
            raise ValueError(
                "tsld-jax: the tokenizer has no BOS or EOS token to start an empty context; "
                "pass prefix_token_id= in --model_args"
            )
        return self.prefix_token_id

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for context, continuation in (request.args for request in requests):
            if context:
                pairs.append(choice.encode_pair(self.model.tokenizer, context, continuation))
                continue
            # As TemplateLM.loglikelihood: an empty context is the prefix token.
            ids = self._encode(continuation)
            if ids and ids[0] != self._prefix():
                pairs.append(([self._prefix()], ids))
            else:
                pairs.append((ids[:1], ids[1:]))
        return self._score(pairs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        # HFLM's windows: disjoint max_length-token windows, each predicted from the prefix
        # token or the tokens just before it.
        windows, owners = [], []
        for number, (text,) in enumerate(request.args for request in requests):
            for window in lm_utils.get_rolling_token_windows(
                token_list=self._encode(text),
                prefix_token=self._prefix(),
                max_seq_len=self.max_length,
                context_len=1,
            ):
                windows.append(lm_utils.make_disjoint_window(window))
                owners.append(number)
        totals = [0.0] * len(requests)
        for owner, (value, _) in zip(owners, self._score(windows) if windows else [], strict=True):
            totals[owner] += value
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences

        eos = (
            self.model.tokenizer.decode([self.eot_token_id])
            if self.eot_token_id is not None
            else None
        )
        groups: dict[str, list[int]] = {}
        for number, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(number)
        out = [""] * len(requests)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            if not kwargs.pop("do_sample", temperature > 0):
                temperature = 0.0
            sampling = generate.Sampling(temperature, float(kwargs.pop("top_p", 1.0) or 1.0))
            texts = generate.generate_text(
                self.model.params,
                self.model.spec,
                self.model.tokenizer,
                [requests[i].args[0] for i in members],
                max_new_tokens=max_new,
                stop_sequences=until,
                batch_size=self.batch_size,
                max_length=self.max_length,
                sampling=sampling,
                quantizer=self.model.quantizer,
            )
            for i, text in zip(members, texts, strict=True):
                out[i] = text
        return out


def _model_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """The --model (-M) value and the --model_args (-a) items (`k=v,k=v` or `k=v k=v`)."""
    model, items, index = None, [], 0
    while index < len(argv):
        flag, equals, value = argv[index].partition("=")
        if flag in ("--model", "-M"):
            model = value if equals else (argv[index + 1] if index + 1 < len(argv) else None)
        elif flag in ("--model_args", "-a"):
            if equals:
                items.append(value)
            else:
                following = index + 1
                while following < len(argv) and not argv[following].startswith("-"):
                    items.append(argv[following])
                    following += 1
        index += 1
    return model, [item for text in items for item in text.split(",") if item.strip()]


def _missing_path(argv: list[str]) -> str | None:
    """The error line for a tsld-jax model_args path that does not exist, else None.

    Checked before the harness starts: it loads every task definition before it builds the model,
    and the model's error would then come 39 lines deep in its traceback.
    """
    from tsld_jax.models import loading

    model, items = _model_args(argv)
    if model != "tsld-jax":
        return None
    for item in items:
        key, _, value = (part.strip() for part in item.partition("="))
        if not value:
            continue
        # checkpoint= and packed= are always local; path= and tokenizer= may be a name or hub id.
        if key in ("checkpoint", "packed") and not os.path.exists(value):
            return f"--model_args {key}={value}: no such file or directory"
        if key in ("path", "tokenizer") and loading.is_missing_local(value):
            return f"--model_args {key}={value}: no such file or directory"
    return None


def main(argv: list[str] | None = None) -> int:
    """The harness's command line with `tsld-jax` registered; a missing model path in
    --model_args is one `error:` line and exit 2, before the harness loads its tasks."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    error = _missing_path(sys.argv[1:])
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
