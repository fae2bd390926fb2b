"""Multiple-choice scoring as lm-evaluation-harness does it, on a tiny random model whose BPE
tokenizer merges a leading space into the next word; templates of every task; metrics."""

import json
import math

import jax
import numpy as np
import pytest
import tiny_models

from tsld_jax.evaluation import choice
from tsld_jax.models import load_model

torch = pytest.importorskip("torch")  # the reference is a PyTorch model

# Byte-level BPE: " " is "Ġ" and "\n" is "Ċ". "Ġcat" is one token, but "cat" without the space is
# three; "Ġcow" has no merge of its own and stays "Ġc", "o", "w".
_CHARS = list("abcdefghijklmnopqrstuvwxyzQA:?.ĠĊ")
_MERGES = [("Ġ", "c"), ("Ġc", "a"), ("Ġca", "t"), ("Ġ", "d"), ("Ġd", "o"), ("Ġdo", "g")]
VOCAB = {ch: i + 1 for i, ch in enumerate(_CHARS)} | {"<unk>": 0}
for left, right in _MERGES:
    VOCAB[left + right] = len(VOCAB)
assert len(VOCAB) <= tiny_models.VOCAB


def _ids(*pieces):
    return [VOCAB[p] for p in pieces]


def _save_bpe_tokenizer(directory):
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE(vocab=VOCAB, merges=_MERGES, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")
    fast.save_pretrained(directory)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2_bpe")
    torch_model = tiny_models.build("gpt2", str(directory))
    _save_bpe_tokenizer(str(directory))
    return load_model(str(directory)), torch_model


def test_encode_pair_splits_the_whole_encoding(tiny):
    tokenizer = tiny[0].tokenizer
    assert tokenizer("cat", add_special_tokens=False)["input_ids"] == _ids("c", "a", "t")
    context = "Q: a dog?\nA:"
    context_ids = _ids("Q", ":", "Ġ", "a", "Ġdog", "?", "Ċ", "A", ":")
    assert choice.encode_pair(tokenizer, context, " cat") == (context_ids, _ids("Ġcat"))
    assert choice.encode_pair(tokenizer, context, " cow") == (context_ids, _ids("Ġc", "o", "w"))
    # A trailing space of the context moves to the continuation: " cat" again, not "c a t".
    assert choice.encode_pair(tokenizer, context + " ", "cat") == (context_ids, _ids("Ġcat"))


def _torch_loglik(model, context_ids, continuation_ids):
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.double()[0], dim=-1)
    n = len(context_ids)
    return sum(float(logp[n - 1 + j, t]) for j, t in enumerate(continuation_ids))


def _write_arc(data_dir, questions):
    path = data_dir / "arc" / "ARC-Easy-Test.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for number, (stem, texts, key) in enumerate(questions):
            labels = "ABCD"[: len(texts)]
            record = {
                "id": f"q{number}",
                "question": {
                    "stem": stem,
                    "choices": [
                        {"text": t, "label": lab} for t, lab in zip(texts, labels, strict=True)
                    ],
                },
                "answerKey": key,
            }
            f.write(json.dumps(record) + "\n")


QUESTIONS = [
    ("a cat?", ["cat", "dog", "cow"], "A"),
    ("dog?", ["a cat", "dog"], "B"),
    ("cow.", ["cow", "cat", "dogdog"], "C"),
    ("at a?", ["tac", "cat", "a"], "B"),
    ("god?", ["dog", "cod"], "A"),
]


def test_arc_scores_match_a_hand_computation(tiny, tmp_path):
    model, torch_model = tiny
    _write_arc(tmp_path, QUESTIONS)
    result = choice.run(
        model.params,
        model.spec,
        model.tokenizer,
        task="arc_easy",
        data_dir=str(tmp_path),
        batch_size=3,
        progress=False,
    )
    acc, acc_norm = [], []
    for stem, texts, key in QUESTIONS:
        context = f"Question: {stem}\nAnswer:"
        lls = []
        for text in texts:
            context_ids, continuation_ids = choice.encode_pair(model.tokenizer, context, " " + text)
            lls.append(_torch_loglik(torch_model, context_ids, continuation_ids))
        gold = "ABCD".index(key)
        acc.append(float(np.argmax(lls) == gold))
        per_char = [ll / len(t) for ll, t in zip(lls, texts, strict=True)]
        acc_norm.append(float(np.argmax(per_char) == gold))
    assert 0 < sum(acc) < len(acc) or 0 < sum(acc_norm) < len(acc_norm)  # not trivially all/none
    assert result["acc"] == pytest.approx(np.mean(acc))
    assert result["acc_norm"] == pytest.approx(np.mean(acc_norm))
    assert result["acc_stderr"] == pytest.approx(np.std(acc, ddof=1) / math.sqrt(len(acc)))
    assert result["n"] == len(QUESTIONS) and result["split"] == "test"


@pytest.mark.parametrize("share_contexts", [True, False])
def test_loglikelihoods_match_transformers_and_greedy_flag(tiny, share_contexts):
    model, torch_model = tiny
    question = _ids("Q", ":", "Ġ", "a", "Ġdog", "?", "Ċ", "A", ":")
    requests = [
        (_ids("Q", ":", "Ġ", "a"), _ids("Ġcat")),
        (question, _ids("Ġc", "o", "w", ".")),
        (_ids("A"), _ids(":", "Ġ", "t")),
        (question, _ids("Ġcat")),
        (question, _ids("Ġdog", "Ġdog", "Ġdog")),
    ]
    lls, greedy = choice.loglikelihoods(
        model.params, model.spec, requests, batch_size=2, share_contexts=share_contexts
    )
    expected = [_torch_loglik(torch_model, c, t) for c, t in requests]
    np.testing.assert_allclose(lls, expected, atol=1e-4)
    # is_greedy: every continuation token is the argmax at its position.
    argmax_request = (_ids("Q"), [int(np.argmax(_torch_next(torch_model, _ids("Q"))))])
    _, flags = choice.loglikelihoods(
        model.params,
        model.spec,
        [argmax_request, requests[0]],
        batch_size=2,
        share_contexts=share_contexts,
    )
    assert flags[0] and not flags[1]


def test_too_long_requests_lose_context_on_the_left(tiny):
    model, torch_model = tiny
    context, continuation = _ids("Q", ":", "Ġ", "a", "Ġdog", "?"), _ids("Ġcat", "Ċ")
    (ll,), _ = choice.loglikelihoods(
        model.params, model.spec, [(context, continuation)], max_length=5
    )
    # The harness keeps the last max_length + 1 = 6 tokens: "Ġ a Ġdog ?" + the continuation.
    assert ll == pytest.approx(_torch_loglik(torch_model, context[2:], continuation), abs=1e-4)


def _torch_next(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].numpy()


@pytest.mark.parametrize("share_contexts", [True, False])
def test_one_compiled_shape_per_length_bucket(tiny, share_contexts):
    model, _ = tiny
    rng = np.random.default_rng(0)
    requests = [
        (rng.integers(1, 30, size=n).tolist(), rng.integers(1, 30, size=3).tolist())
        for n in (18, 20, 22, 25, 28, 19, 21)
    ]
    scorer = choice._score_shared if share_contexts else choice._score_batch
    kwargs = {"batch_size": 2, "share_contexts": share_contexts}
    choice.loglikelihoods(model.params, model.spec, requests[:2], **kwargs)
    before = scorer._cache_size()
    choice.loglikelihoods(model.params, model.spec, requests, **kwargs)  # 4 batches, one bucket
    assert scorer._cache_size() == before


def test_metrics_by_hand():
    docs = [
        choice.ChoiceDoc("c", ("ab", "abcdefgh"), 1),  # acc picks 0; acc_norm -4/8 > -3/2 picks 1
        choice.ChoiceDoc("c", ("x", "y"), 0),
        choice.ChoiceDoc("c", ("x", "y", "z"), 2),
        choice.ChoiceDoc("c", ("x", "y"), 0),
    ]
    lls = [[-3.0, -4.0], [-1.0, -2.0], [-5.0, -5.0, -1.0], [-2.0, -2.0]]  # ties go to the first
    metrics = choice.choice_metrics(docs, lls)
    assert metrics["acc"] == 0.75 and metrics["acc_norm"] == 1.0
    assert metrics["acc_stderr"] == pytest.approx(0.25)  # sqrt(0.75 / 3) / sqrt(4)
    assert metrics["acc_norm_stderr"] == 0.0 and metrics["n"] == 4


def test_prompt_templates_of_every_task(shared_data):
    data = str(shared_data)
    piqa = choice.load_docs("piqa", data_dir=data, limit=1)[0]
    assert (
        piqa.context
        == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    )
    assert piqa.choices[0].startswith("Provide the guinea pig") and piqa.gold == 0
    arc = choice.load_docs("arc_easy", data_dir=data, limit=1)[0]
    assert arc.context == (
        "Question: Which statement best explains why photosynthesis is the foundation of most "
        "food webs?\nAnswer:"
    )
    assert arc.choices[0] == "Sunlight is the source of energy for nearly all ecosystems."
    assert arc.gold == 0 and len(arc.choices) == 4
    assert len(choice.load_docs("arc_challenge", data_dir=data)) == 1172
    obqa = choice.load_docs("openbookqa", data_dir=data, limit=1)[0]
    assert obqa.context.startswith("A person wants to start saving money")
    assert obqa.context.endswith("the best way to save money is to")  # the bare stem
    assert obqa.choices[1] == "quit eating lunch out" and obqa.gold == 1
    sst2 = choice.load_docs("sst2", data_dir=data)
    assert sst2[0].context == (
        "it 's a charming and often affecting journey . \n"
        "Question: Is this sentence positive or negative?\nAnswer:"
    )
    assert sst2[0].choices == ("negative", "positive") and sst2[0].gold == 1
    assert len(sst2) == 872 and sum(d.gold for d in sst2) == 444


def test_hub_records_have_the_same_docs():
    hub_arc = {
        "id": "x",
        "question": "Why?",
        "answerKey": "2",
        "choices": {"text": ["no", "yes"], "label": ["1", "2"]},
    }
    assert choice.TASKS["arc_easy"].to_doc(hub_arc) == choice.ChoiceDoc(
        "Question: Why?\nAnswer:", ("no", "yes"), 1
    )
    hub_obqa = {
        "id": "y",
        "question_stem": "The sun is",
        "answerKey": "A",
        "choices": {"text": ["hot", "cold"], "label": ["A", "B"]},
    }
    assert choice.TASKS["openbookqa"].to_doc(hub_obqa) == choice.ChoiceDoc(
        "The sun is", ("hot", "cold"), 0
    )


def test_jit_and_eager_agree(tiny):
    model, _ = tiny
    requests = [(_ids("Q", ":"), _ids("Ġcat", "?"))]
    jitted, _ = choice.loglikelihoods(model.params, model.spec, requests, batch_size=1)
    with jax.disable_jit():
        eager, _ = choice.loglikelihoods(model.params, model.spec, requests, batch_size=1)
    np.testing.assert_allclose(jitted, eager, atol=1e-5)
