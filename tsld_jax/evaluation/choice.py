"""Multiple choice by log-likelihood, as lm-evaluation-harness 0.4 scores it.

Conventions (lm_eval/tasks/{piqa,arc,openbookqa,glue}/*.yaml and lm_eval/models/huggingface.py):

- context: the task's prompt template, zero-shot (`"Question: {goal}\\nAnswer:"` for PIQA,
  `"Question: {question}\\nAnswer:"` for ARC, the bare question stem for OpenBookQA,
  `"{sentence}\\nQuestion: Is this sentence positive or negative?\\nAnswer:"` for SST-2);
- each choice is a continuation `" " + choice` (target delimiter " ");
- tokenization (`_encode_pair`): trailing spaces of the context move to the continuation, then
  context + continuation is encoded whole, without special tokens, and split after the
  context's own token count; so a continuation whose leading space merges with the first word
  is scored as the model would see it in running text;
- the input is (context + continuation)[-(max_length + 1):][:-1], and a choice's log-likelihood
  is the sum of the log-probabilities of its continuation tokens;
- `acc`: argmax of the log-likelihoods is the gold index; `acc_norm`: argmax of each
  log-likelihood divided by its choice's length in characters (without the delimiter); ties
  go to the first choice (np.argmax). Standard errors are the sample standard error of the mean.

Batching: the choices of a question share their context, so each distinct context runs once
into a KV cache and its continuations are scored against copies of it (the same sums, about
half the work); a request longer than max_length is scored as one sequence, as the harness does.
Batches run longest first, right-padded to bucketed lengths, and only the continuation
positions are unembedded, so the (T, V) logits of the context are never built and each bucket
shape compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from tsld_jax.data.sources import DataError
from tsld_jax.evaluation import sources
from tsld_jax.generate import bucket_length
from tsld_jax.models import decoder
from tsld_jax.models.spec import ModelSpec

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ChoiceDoc:
    """One question: the context, the choice strings (without delimiter) and the gold index."""

    context: str
    choices: tuple[str, ...]
    gold: int


@dataclasses.dataclass(frozen=True)
class ChoiceTask:
    """A multiple-choice task.

    Attributes:
      name: the task name used by eval.py.
      default_split: the split the harness evaluates.
      local_files: split -> file(s) relative to --data-dir.
      hub: (dataset path, config name) on the Hugging Face hub.
      hub_splits: our split name -> the hub's.
      read_local: (data_dir, split) -> records, from the local layout.
      to_doc: record (local or hub form) -> ChoiceDoc.
      metrics: the harness's metric list ("acc", "acc_norm").
    """

    name: str
    default_split: str
    hub: tuple[str, str | None]
    read_local: Callable[[str, str], list[dict[str, Any]]]
    to_doc: Callable[[dict[str, Any]], ChoiceDoc]
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    hub_splits: dict[str, str] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------------- the tasks


def _read_piqa(data_dir: str, split: str) -> list[dict[str, Any]]:
    stem = {"validation": "valid", "train": "train"}.get(split)
    if stem is None:
        raise DataError(f"piqa has no {split!r} split; expected validation or train")
    records_path = sources.local_path(data_dir, f"piqa/{stem}.jsonl")
    labels_path = sources.local_path(data_dir, f"piqa/{stem}-labels.lst")
    records = sources.read_jsonl(records_path, required=("goal", "sol1", "sol2"))
    labels = [line.strip() for line in sources.read_lines(labels_path) if line.strip()]
    if len(labels) != len(records):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(records)} questions")
    for number, (record, label) in enumerate(zip(records, labels, strict=True), start=1):
        if label not in ("0", "1"):
            raise DataError(f"{labels_path}:{number}: label {label!r} is not 0 or 1")
        record["label"] = int(label)
    return records


def _piqa_doc(record: dict[str, Any]) -> ChoiceDoc:
    return ChoiceDoc(
        f"Question: {record['goal']}\nAnswer:", (record["sol1"], record["sol2"]), record["label"]
    )


def _arc_reader(subset: str, files: dict[str, str]):
    def read(data_dir: str, split: str) -> list[dict[str, Any]]:
        if split not in files:
            raise DataError(f"{subset} has no {split!r} split; expected one of {sorted(files)}")
        path = sources.local_path(data_dir, files[split])
        return sources.read_jsonl(path, required=("question", "answerKey"))

    return read


def _question_parts(record: dict[str, Any]) -> tuple[str, list[str], list[str]]:
    """(stem, choice texts, labels) from the original AI2 jsonl or the hub's flattened form."""
    question = record.get("question")
    if isinstance(question, dict):  # AI2's files: question.stem, question.choices[{text, label}]
        choices = question["choices"]
        return question["stem"], [c["text"] for c in choices], [c["label"] for c in choices]
    stem = record["question_stem"] if "question_stem" in record else question
    return stem, list(record["choices"]["text"]), list(record["choices"]["label"])


def _gold_index(labels: list[str], key: str, where: str) -> int:
    if key not in labels:
        raise DataError(f"{where}: answerKey {key!r} is not one of the labels {labels}")
    return labels.index(key)


def _arc_doc(record: dict[str, Any]) -> ChoiceDoc:
    stem, texts, labels = _question_parts(record)
    gold = _gold_index(labels, record["answerKey"], record.get("id", "?"))
    return ChoiceDoc(f"Question: {stem}\nAnswer:", tuple(texts), gold)


def _openbookqa_doc(record: dict[str, Any]) -> ChoiceDoc:
    stem, texts, labels = _question_parts(record)
    gold = _gold_index(labels, record["answerKey"].lstrip(), record.get("id", "?"))
    return ChoiceDoc(stem, tuple(texts), gold)


def _read_sst2(data_dir: str, split: str) -> list[dict[str, Any]]:
    stem = {"validation": "dev", "train": "train"}.get(split)
    if stem is None:
        raise DataError(f"sst2 has no labelled {split!r} split; expected validation or train")
    path = sources.local_path(data_dir, f"glue/sst2/{stem}.tsv")
    records = sources.read_tsv(path, ("sentence", "label"))
    for number, record in enumerate(records, start=2):
        if record["label"] not in ("0", "1"):
            raise DataError(f"{path}:{number}: label {record['label']!r} is not 0 or 1")
        record["label"] = int(record["label"])
    return records


def _sst2_doc(record: dict[str, Any]) -> ChoiceDoc:
    # The GLUE sentence is used as is (GLUE's sentences end with a space; the harness keeps it).
    return ChoiceDoc(
        f"{record['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:",
        ("negative", "positive"),
        int(record["label"]),
    )


def _arc_files(subset: str) -> dict[str, str]:
    return {
        split: f"arc/{subset}-{stem}.jsonl"
        for split, stem in (("train", "Train"), ("validation", "Dev"), ("test", "Test"))
    }


# GLUE tasks scored as multiple choice; add rte, mrpc, qnli, ... here with their own doc function.
GLUE_TASKS: dict[str, ChoiceTask] = {
    "sst2": ChoiceTask(
        name="sst2",
        default_split="validation",
        hub=("nyu-mll/glue", "sst2"),
        read_local=_read_sst2,
        to_doc=_sst2_doc,
        metrics=("acc",),
    ),
}

TASKS: dict[str, ChoiceTask] = {
    # The harness's piqa.yaml names the hub dataset "piqa" (a loading script, which recent
    # `datasets` no longer runs); "baber/piqa" is the same data as parquet.
    "piqa": ChoiceTask(
        name="piqa",
        default_split="validation",
        hub=("baber/piqa", None),
        read_local=_read_piqa,
        to_doc=_piqa_doc,
    ),
    "arc_easy": ChoiceTask(
        name="arc_easy",
        default_split="test",
        hub=("allenai/ai2_arc", "ARC-Easy"),
        read_local=_arc_reader("ARC-Easy", _arc_files("ARC-Easy")),
        to_doc=_arc_doc,
    ),
    "arc_challenge": ChoiceTask(
        name="arc_challenge",
        default_split="test",
        hub=("allenai/ai2_arc", "ARC-Challenge"),
        read_local=_arc_reader("ARC-Challenge", _arc_files("ARC-Challenge")),
        to_doc=_arc_doc,
    ),
    "openbookqa": ChoiceTask(
        name="openbookqa",
        default_split="test",
        hub=("allenai/openbookqa", "main"),
        read_local=_arc_reader(
            "openbookqa",
            {s: f"openbookqa/{s}.jsonl" for s in ("train", "validation", "test")},
        ),
        to_doc=_openbookqa_doc,
    ),
    **GLUE_TASKS,
}


def load_docs(
    task: str, split: str | None = None, data_dir: str | None = None, limit: int | None = None
) -> list[ChoiceDoc]:
    """The first `limit` questions of a split, from `data_dir` or the hub.

    Args:
      task: a key of TASKS.
      split: the split; the harness's evaluation split when None.
      data_dir: a directory laid out like `shared/data`; the hub when None.
      limit: keep only the first `limit` questions (as the harness's --limit does).

    Returns:
      The questions as ChoiceDocs. Raises DataError for unknown tasks and bad data.
    """
    if task not in TASKS:
        raise DataError(f"unknown multiple-choice task {task!r}; expected one of {sorted(TASKS)}")
    spec = TASKS[task]
    split = split or spec.default_split
    if data_dir is not None:
        if not os.path.isdir(data_dir):
            raise DataError(f"--data-dir {data_dir} is not a directory")
        records = spec.read_local(data_dir, split)
    else:
        records = sources.hub_records(*spec.hub, spec.hub_splits.get(split, split))
    if limit is not None:
        records = records[:limit]
    docs = []
    for record in records:
        try:
            docs.append(spec.to_doc(record))
        except (KeyError, TypeError) as error:
            raise DataError(f"{task}: a record lacks the field {error}") from None
    if not docs:
        raise DataError(f"{task} {split}: no questions")
    return docs


# -------------------------------------------------------------------------------- tokenization


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's context/continuation split.

    Trailing whitespace of the context moves to the continuation; context + continuation is
    encoded whole and split after the context's own token count, both without special tokens.

    Returns:
      (context ids, continuation ids).
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return list(context_ids), list(whole[len(context_ids) :])


# ------------------------------------------------------------------------------------- scoring


@functools.partial(jax.jit, static_argnames=("spec", "quantizer"))
def _score_batch(params, tokens_BxT, mask_BxT, index_BxC, targets_BxC, valid_BxC, spec, quantizer):
    """Whole sequences; only the continuation positions `index_BxC` are unembedded."""
    h_BxTxD, _ = decoder.hidden_states(
        params, tokens_BxT, spec, mask_BxT=mask_BxT, quantizer=quantizer
    )
    h_BxCxD = jnp.take_along_axis(h_BxTxD, index_BxC[..., None], axis=1)
    return _continuation_scores(params, h_BxCxD, targets_BxC, valid_BxC, spec)


def _continuation_scores(params, h_BxCxD, targets_BxC, valid_BxC, spec):
    logits_BxCxV = decoder.unembed(params, h_BxCxD, spec).astype(jnp.float32)
    logp_BxCxV = jax.nn.log_softmax(logits_BxCxV, axis=-1)
    token_logp_BxC = jnp.take_along_axis(logp_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    loglik_B = jnp.sum(jnp.where(valid_BxC, token_logp_BxC, 0.0), axis=-1)
    hit_BxC = (jnp.argmax(logits_BxCxV, axis=-1) == targets_BxC) | ~valid_BxC
    return loglik_B, jnp.all(hit_BxC, axis=-1)


@functools.partial(jax.jit, static_argnames=("spec", "quantizer"))
def _score_shared(
    params,
    context_BxT,
    context_mask_BxT,
    owner_R,
    continuation_RxC,
    continuation_mask_RxC,
    spec,
    quantizer,
):
    """Each context runs once into a KV cache; its continuations (rows R, owned by context
    `owner_R`) then run against a copy of that cache."""
    batch, length = context_BxT.shape
    width = continuation_RxC.shape[1]
    cache = decoder.init_cache(spec, batch, length, params["embed"]["tokens"].dtype)
    h_BxTxD, cache = decoder.hidden_states(
        params, context_BxT, spec, mask_BxT=context_mask_BxT, quantizer=quantizer, cache=cache
    )
    cache = decoder.grow_cache(cache, length + width)  # see generate._prefill
    last_B = jnp.max(jnp.where(context_mask_BxT > 0, jnp.arange(length)[None, :], 0), axis=-1)
    last_h_BxD = jnp.take_along_axis(h_BxTxD, last_B[:, None, None], axis=1)[:, 0]
    per_row = {
        "keys": jnp.take(cache["keys"], owner_R, axis=1),
        "values": jnp.take(cache["values"], owner_R, axis=1),
        "mask": jnp.take(cache["mask"], owner_R, axis=0),
        "positions": jnp.take(cache["positions"], owner_R, axis=0),
        "next_position": jnp.take(cache["next_position"], owner_R, axis=0),
        "index": cache["index"],
    }
    h_RxCxD, _ = decoder.hidden_states(
        params,
        continuation_RxC,
        spec,
        mask_BxT=continuation_mask_RxC,
        quantizer=quantizer,
        cache=per_row,
    )
    # Continuation token j is predicted at the context's last token (j = 0) or at token j - 1.
    first_Rx1xD = jnp.take(last_h_BxD, owner_R, axis=0)[:, None]
    predictors_RxCxD = jnp.concatenate([first_Rx1xD, h_RxCxD[:, :-1]], axis=1)
    return _continuation_scores(
        params, predictors_RxCxD, continuation_RxC, continuation_mask_RxC > 0, spec
    )


def loglikelihoods(
    params: Params,
    spec: ModelSpec,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 8,
    max_length: int = 2048,
    quantizer: Callable | None = None,
    progress: bool = False,
    share_contexts: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Log-likelihood of each continuation given its context, as the harness computes it.

    Args:
      params: decoder parameters.
      spec: the architecture.
      requests: (context ids, continuation ids) pairs; the context must not be empty.
      batch_size: contexts per forward pass (the last batch is padded with copies).
      max_length: the model's context length; longer inputs lose tokens on the left.
      quantizer: as in `decoder.forward`.
      progress: show a progress bar.
      share_contexts: run each distinct context once through a KV cache and score its
        continuations against it (the choices of a question share their context, so this does
        about half the work); False scores every request as one sequence, as the harness does.
        Requests longer than max_length always take the second path.

    Returns:
      (log-likelihoods (N,) float64, is_greedy (N,) bool: every continuation token is the
      argmax of its position).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for context, continuation in requests:
        if not context or not continuation:
            raise DataError("a request has an empty context or continuation")
    loglik = np.zeros(len(requests), np.float64)
    greedy = np.zeros(len(requests), bool)
    bar = tqdm(total=len(requests), desc="loglikelihood", unit="req", disable=not progress)
    fits = [len(c) + len(t) <= max_length + 1 for c, t in requests]
    shared = [i for i in range(len(requests)) if fits[i]] if share_contexts else []
    alone = sorted(set(range(len(requests))) - set(shared))
    if shared:
        _shared_contexts(params, spec, requests, shared, batch_size, quantizer, loglik, greedy, bar)
    if alone:
        _whole_sequences(
            params, spec, requests, alone, batch_size, max_length, quantizer, loglik, greedy, bar
        )
    bar.close()
    return loglik, greedy


def _shared_contexts(params, spec, requests, indices, batch_size, quantizer, loglik, greedy, bar):
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in indices:
        groups.setdefault(tuple(requests[i][0]), []).append(i)
    contexts = sorted(groups, key=lambda c: -(len(c) + max(len(requests[i][1]) for i in groups[c])))
    for start in range(0, len(contexts), batch_size):
        chunk = contexts[start : start + batch_size]
        rows = [i for context in chunk for i in groups[context]]
        owners = [b for b, context in enumerate(chunk) for _ in groups[context]]
        length = bucket_length(max(map(len, chunk)))
        width = bucket_length(max(len(requests[i][1]) for i in rows), minimum=8)
        padded_rows = -(-len(rows) // batch_size) * batch_size
        context_ids = np.zeros((batch_size, length), np.int32)
        context_mask = np.zeros((batch_size, length), np.int32)
        for b, context in enumerate(chunk + [chunk[0]] * (batch_size - len(chunk))):
            context_ids[b, : len(context)], context_mask[b, : len(context)] = context, 1
        owner = np.zeros(padded_rows, np.int32)
        continuation = np.zeros((padded_rows, width), np.int32)
        continuation_mask = np.zeros((padded_rows, width), np.int32)
        filler = rows[0]
        for r, (i, b) in enumerate(
            zip(
                rows + [filler] * (padded_rows - len(rows)),
                owners + [owners[0]] * (padded_rows - len(rows)),
                strict=True,
            )
        ):
            ids = requests[i][1]
            owner[r] = b
            continuation[r, : len(ids)], continuation_mask[r, : len(ids)] = ids, 1
        out_loglik, out_greedy = _score_shared(
            params,
            context_ids,
            context_mask,
            owner,
            continuation,
            continuation_mask,
            spec,
            quantizer,
        )
        loglik[rows] = np.asarray(out_loglik)[: len(rows)]
        greedy[rows] = np.asarray(out_greedy)[: len(rows)]
        bar.update(len(rows))


def _whole_sequences(
    params, spec, requests, indices, batch_size, max_length, quantizer, loglik, greedy, bar
):
    inputs, targets = {}, {}
    for i in indices:
        context, continuation = requests[i]
        window = (list(context) + list(continuation))[-(max_length + 1) :][:-1]
        inputs[i] = window
        # Only a continuation longer than max_length loses tokens (the harness asserts it fits).
        targets[i] = list(continuation)[-len(window) :]
    order = sorted(indices, key=lambda i: -len(inputs[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        length = bucket_length(max(len(inputs[i]) for i in rows))
        width = min(length, bucket_length(max(len(targets[i]) for i in rows), minimum=8))
        tokens = np.zeros((batch_size, length), np.int32)
        mask = np.zeros((batch_size, length), np.int32)
        index = np.zeros((batch_size, width), np.int32)
        target = np.zeros((batch_size, width), np.int32)
        valid = np.zeros((batch_size, width), bool)
        for r, i in enumerate(rows + [rows[0]] * (batch_size - len(rows))):
            n, c = len(inputs[i]), len(targets[i])
            tokens[r, :n], mask[r, :n] = inputs[i], 1
            # The logits at input positions n - c ... n - 1 predict the continuation tokens.
            index[r, :c] = np.arange(n - c, n)
            target[r, :c], valid[r, :c] = targets[i], True
        out_loglik, out_greedy = _score_batch(
            params, tokens, mask, index, target, valid, spec, quantizer
        )
        loglik[rows] = np.asarray(out_loglik)[: len(rows)]
        greedy[rows] = np.asarray(out_greedy)[: len(rows)]
        bar.update(len(rows))


def choice_metrics(
    docs: Sequence[ChoiceDoc], doc_logliks: Sequence[Sequence[float]]
) -> dict[str, Any]:
    """acc and acc_norm (per-character normalised) with their standard errors.

    Args:
      docs: the questions.
      doc_logliks: per question, the log-likelihood of each choice.

    Returns:
      {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}.
    """
    acc, acc_norm = [], []
    for doc, lls in zip(docs, doc_logliks, strict=True):
        lls = np.asarray(lls, dtype=np.float64)
        lengths = np.array([float(len(choice)) for choice in doc.choices])
        acc.append(1.0 if int(np.argmax(lls)) == doc.gold else 0.0)
        acc_norm.append(1.0 if int(np.argmax(lls / lengths)) == doc.gold else 0.0)
    return {
        "acc": float(np.mean(acc)),
        "acc_stderr": sources.mean_stderr(acc),
        "acc_norm": float(np.mean(acc_norm)),
        "acc_norm_stderr": sources.mean_stderr(acc_norm),
        "n": len(docs),
    }


def score_docs(
    params: Params,
    spec: ModelSpec,
    tokenizer: Any,
    docs: Sequence[ChoiceDoc],
    **kwargs: Any,
) -> list[list[float]]:
    """Per question, the log-likelihood of each `" " + choice` after its context.

    Keyword arguments go to `loglikelihoods`.
    """
    requests, owners = [], []
    for d, doc in enumerate(docs):
        for choice in doc.choices:
            requests.append(encode_pair(tokenizer, doc.context, " " + choice))
            owners.append(d)
    loglik, _ = loglikelihoods(params, spec, requests, **kwargs)
    out: list[list[float]] = [[] for _ in docs]
    for owner, value in zip(owners, loglik, strict=True):
        out[owner].append(float(value))
    return out


def run(
    params: Params,
    spec: ModelSpec,
    tokenizer: Any,
    *,
    task: str,
    split: str | None = None,
    data_dir: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int = 2048,
    quantizer: Callable | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Loads and scores one multiple-choice task; returns the results dictionary.

    Args:
      params: decoder parameters.
      spec: the architecture.
      tokenizer: a Hugging Face tokenizer.
      task: a key of TASKS.
      split: the split; the harness's evaluation split when None.
      data_dir: local data laid out like `shared/data`; the hub when None.
      limit: only the first `limit` questions.
      batch_size: requests per forward pass.
      max_length: the model's context length.
      quantizer: as in `decoder.forward`.
      progress: show a progress bar.

    Returns:
      {"task", "split", "num_fewshot": 0, "n", and the task's metrics with "<metric>_stderr"}.
    """
    docs = load_docs(task, split, data_dir, limit)
    lls = score_docs(
        params,
        spec,
        tokenizer,
        docs,
        batch_size=batch_size,
        max_length=max_length,
        quantizer=quantizer,
        progress=progress,
    )
    if not np.all(np.isfinite([x for row in lls for x in row])):
        raise FloatingPointError(f"{task}: non-finite log-likelihood")
    metrics = choice_metrics(docs, lls)
    result: dict[str, Any] = {
        "task": task,
        "split": split or TASKS[task].default_split,
        "num_fewshot": 0,
    }
    for name in TASKS[task].metrics:
        result[name] = metrics[name]
        result[f"{name}_stderr"] = metrics[f"{name}_stderr"]
    result["n"] = metrics["n"]
    return result
