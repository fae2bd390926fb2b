"""The harness's ARC and PIQA data, read from a local folder laid out like shared/data.

The folder is `--metadata '{"data_dir": ...}'` or $TSLD_DATA_DIR. Records are read by eval.py's
own readers and given the hub datasets' fields, so the YAMLs keep the harness's templates.
"""

import os

import datasets

from tsld_jax.evaluation import choice


def _data_dir(data_dir):
    data_dir = data_dir or os.environ.get("TSLD_DATA_DIR")
    if not data_dir:
        raise ValueError(
            "tsld lm-eval tasks need local data: --metadata '{\"data_dir\": DIR}' or TSLD_DATA_DIR"
        )
    return data_dir


def _arc(subset_task, data_dir):
    spec = choice.TASKS[subset_task]
    splits = {}
    for split in ("train", "validation", "test"):
        rows = []
        for record in spec.read_local(data_dir, split):
            question = record["question"]
            rows.append(
                {
                    "id": record["id"],
                    "question": question["stem"],
                    "choices": {
                        "text": [c["text"] for c in question["choices"]],
                        "label": [c["label"] for c in question["choices"]],
                    },
                    "answerKey": record["answerKey"],
                }
            )
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)


def arc_easy(data_dir=None, **_):
    return _arc("arc_easy", _data_dir(data_dir))


def arc_challenge(data_dir=None, **_):
    return _arc("arc_challenge", _data_dir(data_dir))


def piqa(data_dir=None, **_):
    # shared/data has no PIQA train split: only validation, the split the harness evaluates.
    records = choice.TASKS["piqa"].read_local(_data_dir(data_dir), "validation")
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(records)})
