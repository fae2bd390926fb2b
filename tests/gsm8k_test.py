"""GSM8K as lm-evaluation-harness scores it: filters, normalisation, few-shot prompts, run()."""

import json
import random

import pytest

from tsld_jax.evaluation import gsm8k


@pytest.mark.parametrize(
    "response, strict, flexible",
    [
        ("5 + 5 = 10.\n#### 1,234.", "1,234.", "1,234."),
        ("She pays $12 then $3.50 each.", "[invalid]", "$3.50"),
        ("3 apples and 12 pears #### -7 and 9", "-7", "9"),
        ("3 apples, then 4", "[invalid]", "4"),  # single digits come from the second group
        ("no numbers here", "[invalid]", "[invalid]"),
        ("####12", "[invalid]", "12"),  # strict wants "#### " with the space
    ],
)
def test_filters(response, strict, flexible):
    assert gsm8k.strict_match(response) == strict
    assert gsm8k.flexible_extract(response) == flexible


def test_normalisation_and_exact_match():
    reference = "She has 3 + 4 = <<3+4=7>>7 apples.\n#### 1,207"
    assert gsm8k.normalize(reference) == "1207"
    assert gsm8k.normalize("$1,207.") == "1207"
    assert gsm8k.normalize("1207.5.") == "1207.5"  # only the final "." goes
    assert gsm8k.exact_match("1,207.", reference) == 1.0
    assert gsm8k.exact_match("1207.0", reference) == 0.0  # string equality, not numeric
    assert gsm8k.exact_match("[invalid]", reference) == 0.0


def test_fewshot_prompts_follow_the_harness_sampler():
    train = [{"question": f"q{i}?", "answer": f"a{i}\n#### {i}"} for i in range(40)]
    docs = [{"question": "What?", "answer": "#### 1"}, {"question": "Who?", "answer": "#### 2"}]
    prompts = gsm8k.fewshot_prompts(docs, train, num_fewshot=3)
    rnd = random.Random(1234)  # one sampler for the run: the second prompt continues its stream
    for doc, prompt in zip(docs, prompts, strict=True):
        shots = rnd.sample(range(40), 3)
        expected = "".join(f"Question: q{i}?\nAnswer: a{i}\n#### {i}\n\n" for i in shots)
        assert prompt == expected + f"Question: {doc['question']}\nAnswer:"
    assert gsm8k.fewshot_prompts(docs, train, num_fewshot=0) == [
        "Question: What?\nAnswer:",
        "Question: Who?\nAnswer:",
    ]


def _write_gsm8k(data_dir, test_records, train_records):
    folder = data_dir / "gsm8k"
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in (("test", test_records), ("train", train_records)):
        with open(folder / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


def test_run_scores_generations_by_hand(tmp_path, monkeypatch):
    tests = [
        {"question": "A?", "answer": "2 + 70 = 72\n#### 72"},
        {"question": "B?", "answer": "#### 10"},
        {"question": "C?", "answer": "#### 1,000"},
        {"question": "D?", "answer": "#### 5"},
    ]
    train = [{"question": f"t{i}", "answer": f"w{i}\n#### {i}"} for i in range(10)]
    _write_gsm8k(tmp_path, tests, train)
    responses = [
        " 70 + 2 = 72.\n#### 72",  # strict and flexible
        " The answer is 10.",  # flexible only
        " So $1,000 in all.\n#### 999",  # strict wrong; flexible takes the last number, 999
        " #### 5\n\nQ",  # both
    ]
    calls = {}

    def fake_generate_text(params, spec, tokenizer, prompts, **kwargs):
        calls.update(kwargs, prompts=prompts)
        return responses[: len(prompts)]

    monkeypatch.setattr(gsm8k.generate, "generate_text", fake_generate_text)
    result = gsm8k.run(None, None, None, data_dir=str(tmp_path), keep_samples=1, progress=False)
    assert result["exact_match_strict"] == 0.5  # questions A and D
    assert result["exact_match_flexible"] == 0.75  # A, B and D
    assert result["exact_match_strict_stderr"] == pytest.approx(
        (1 / 3) ** 0.5 / 2  # sample std of [1, 0, 0, 1] is sqrt(1/3); divided by sqrt(4)
    )
    assert result["n"] == 4 and result["num_fewshot"] == 5 and result["split"] == "test"
    assert result["samples"][0]["strict"] == "72"
    assert calls["stop_sequences"] == ("Question:", "</s>", "<|im_end|>")
    assert calls["max_new_tokens"] == 256
    prompt = calls["prompts"][0]
    assert prompt.count("Question: ") == 6 and prompt.endswith("Question: A?\nAnswer:")
    zero = gsm8k.run(None, None, None, data_dir=str(tmp_path), num_fewshot=0, limit=2)
    assert calls["prompts"] == ["Question: A?\nAnswer:", "Question: B?\nAnswer:"]
    assert zero["num_fewshot"] == 0 and zero["n"] == 2
