"""GSM8K: few-shot greedy generation, scored as lm-evaluation-harness 0.4's `gsm8k` task (v3).

- prompt: `num_fewshot` (5) solved training questions, each
  `"Question: {question}\\nAnswer: {answer}\\n\\n"` (target delimiter " ", few-shot delimiter
  "\\n\\n", the full worked answer with its "#### N" line), then
  `"Question: {question}\\nAnswer:"`. The examples are drawn as the harness's default sampler
  draws them: one `random.Random(1234)` shared by the whole run, `rnd.sample(train, k)` per test
  question in order. `num_fewshot=0` gives the bare zero-shot prompt, the setting for models
  fine-tuned on GSM8K;
- generation: greedy, until "Question:", "</s>", "<|im_end|>" or the EOS token, at most 256 new
  tokens, the prompt left-truncated to max_length - 256 tokens;
- filters: `strict-match` takes the first match of `#### (\\-?[0-9\\.\\,]+)`; `flexible-extract`
  takes the last match of `(-?[$0-9.,]{2,})|(-?[0-9]+)` (its non-empty group); no match gives
  "[invalid]";
- `exact_match`: prediction and the reference answer both lose "," "$", everything up to
  "#### " and a final ".", are lower-cased, and must then be equal.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

from tsld_jax import generate
from tsld_jax.data.sources import DataError
from tsld_jax.evaluation import sources

Params = dict[str, Any]

STOP_SEQUENCES = ("Question:", "</s>", "<|im_end|>")
FEWSHOT_SEED = 1234
DEFAULT_FEWSHOT = 5
MAX_GEN_TOKS = 256
INVALID = "[invalid]"
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")


def load_split(split: str, data_dir: str | None = None) -> list[dict[str, str]]:
    """GSM8K records {"question", "answer"} of "train" or "test", locally or from the hub."""
    if split not in ("train", "test"):
        raise DataError(f"gsm8k has no {split!r} split; expected test or train")
    if data_dir is None:
        records = sources.hub_records("openai/gsm8k", "main", split)
    else:
        if not os.path.isdir(data_dir):
            raise DataError(f"--data-dir {data_dir} is not a directory")
        path = sources.local_path(data_dir, f"gsm8k/{split}.jsonl")
        records = sources.read_jsonl(path, required=("question", "answer"))
    return [{"question": r["question"], "answer": r["answer"]} for r in records]


def fewshot_prompts(
    docs: Sequence[dict[str, str]],
    train: Sequence[dict[str, str]],
    num_fewshot: int = DEFAULT_FEWSHOT,
    seed: int = FEWSHOT_SEED,
) -> list[str]:
    """The harness's prompt for each test question, in order (the sampler's state carries over
    from one question to the next, so the order matters).

    Args:
      docs: the test questions, in evaluation order.
      train: the few-shot pool (the training split).
      num_fewshot: examples per prompt; 0 for zero-shot.
      seed: the sampler's seed (the harness's default is 1234).

    Returns:
      One prompt per question.
    """
    if num_fewshot < 0:
        raise DataError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    if num_fewshot > len(train):
        raise DataError(f"{num_fewshot} few-shot examples requested, {len(train)} available")
    rnd = random.Random(seed)
    prompts = []
    for doc in docs:
        shots = rnd.sample(range(len(train)), num_fewshot) if num_fewshot else []
        examples = "".join(
            f"Question: {train[i]['question']}\nAnswer: {train[i]['answer']}\n\n" for i in shots
        )
        prompts.append(f"{examples}Question: {doc['question']}\nAnswer:")
    return prompts


def strict_match(response: str) -> str:
    """The `strict-match` filter: the number after the first "#### ", or "[invalid]"."""
    found = _STRICT.findall(response)
    return found[0].strip() if found else INVALID


def flexible_extract(response: str) -> str:
    """The `flexible-extract` filter: the last number-like match, or "[invalid]"."""
    found = _FLEXIBLE.findall(response)
    if not found:
        return INVALID
    groups = [group for group in found[-1] if group]
    return groups[0].strip() if groups else INVALID


def normalize(text: str) -> str:
    """exact_match's normalisation: drop ",", "$", up to "#### ", a final "."; lower-case."""
    for pattern in _IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised prediction equals the normalised reference answer."""
    return 1.0 if normalize(prediction) == normalize(reference) else 0.0


def score_responses(
    responses: Sequence[str], references: Sequence[str]
) -> dict[str, float | int | None]:
    """Both filters' exact match over the responses, with standard errors.

    Returns:
      {"exact_match_strict", "exact_match_strict_stderr", "exact_match_flexible",
      "exact_match_flexible_stderr", "n"}.
    """
    out: dict[str, float | int | None] = {}
    for name, extract in (("strict", strict_match), ("flexible", flexible_extract)):
        scores = [
            exact_match(extract(r), ref) for r, ref in zip(responses, references, strict=True)
        ]
        out[f"exact_match_{name}"] = sum(scores) / len(scores)
        out[f"exact_match_{name}_stderr"] = sources.mean_stderr(scores)
    out["n"] = len(responses)
    return out


def run(
    params: Params,
    spec: Any,
    tokenizer: Any,
    *,
    split: str | None = None,
    data_dir: str | None = None,
    limit: int | None = None,
    num_fewshot: int = DEFAULT_FEWSHOT,
    batch_size: int = 8,
    max_new_tokens: int = MAX_GEN_TOKS,
    max_length: int = 2048,
    quantizer: Callable | None = None,
    progress: bool = True,
    keep_samples: int = 0,
) -> dict[str, Any]:
    """Generates and scores GSM8K answers; returns the results dictionary.

    Args:
      params: decoder parameters.
      spec: the architecture.
      tokenizer: a Hugging Face tokenizer.
      split: "test" (default) or "train".
      data_dir: local data laid out like `shared/data`; the hub when None.
      limit: only the first `limit` questions.
      num_fewshot: 5 as in the harness; 0 for the zero-shot setting of fine-tuned models.
      batch_size: prompts per generation batch.
      max_new_tokens: the generation budget (the harness's max_gen_toks, 256).
      max_length: the model's context length.
      quantizer: as in `decoder.forward`.
      progress: show a progress bar.
      keep_samples: keep this many (prompt tail, response, filtered answers) in the result.

    Returns:
      {"task", "split", "num_fewshot", "exact_match_strict", "exact_match_flexible" (+ stderr),
      "n", optionally "samples"}.
    """
    split = split or "test"
    docs = load_split(split, data_dir)
    if limit is not None:
        docs = docs[:limit]
    if not docs:
        raise DataError(f"gsm8k {split}: no questions")
    train = load_split("train", data_dir) if num_fewshot else []
    prompts = fewshot_prompts(docs, train, num_fewshot)
    responses = generate.generate_text(
        params,
        spec,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        stop_sequences=STOP_SEQUENCES,
        batch_size=batch_size,
        max_length=max_length,
        quantizer=quantizer,
        progress=progress,
    )
    result: dict[str, Any] = {"task": "gsm8k", "split": split, "num_fewshot": num_fewshot}
    result.update(score_responses(responses, [doc["answer"] for doc in docs]))
    if keep_samples:
        result["samples"] = [
            {
                "question": doc["question"],
                "response": response,
                "strict": strict_match(response),
                "flexible": flexible_extract(response),
                "target": normalize(doc["answer"]),
            }
            for doc, response in list(zip(docs, responses, strict=True))[:keep_samples]
        ]
    return result
