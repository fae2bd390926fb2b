"""Scoring and generation on the real SmolLM2-135M against transformers."""

import numpy as np
import pytest

from tsld_jax import generate
from tsld_jax.evaluation import choice, gsm8k

torch = pytest.importorskip("torch")  # the reference is a PyTorch model

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # The reference runs many small forwards: with the CPU shared, more OpenMP threads than
    # free cores spin and make them several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_arc_easy_loglikelihoods_match_transformers(smollm2, smollm2_torch, shared_data):
    tokenizer = smollm2.tokenizer
    docs = choice.load_docs("arc_easy", data_dir=str(shared_data), limit=20)
    requests = [
        choice.encode_pair(tokenizer, doc.context, " " + text)
        for doc in docs
        for text in doc.choices
    ]
    ours, _ = choice.loglikelihoods(smollm2.params, smollm2.spec, requests, batch_size=8)
    theirs = []
    with torch.no_grad():
        for context, continuation in requests:
            ids = torch.tensor([(context + continuation)[:-1]])
            logp = torch.log_softmax(smollm2_torch(input_ids=ids).logits[0].double(), dim=-1)
            positions = range(len(context) - 1, len(context) - 1 + len(continuation))
            theirs.append(
                sum(float(logp[p, t]) for p, t in zip(positions, continuation, strict=True))
            )
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)
    assert len(requests) >= 76 and np.ptp(theirs) > 10  # a real spread of answers


def test_gsm8k_greedy_generation_matches_transformers(smollm2, smollm2_torch, shared_data):
    tokenizer = smollm2.tokenizer
    docs = gsm8k.load_split("test", str(shared_data))[:3]
    prompts = gsm8k.fewshot_prompts(docs, gsm8k.load_split("train", str(shared_data)))
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    length = max(map(len, encoded))
    tokens = np.zeros((3, length), np.int32)
    mask = np.zeros((3, length), np.int32)
    for row, ids in enumerate(encoded):  # left padding, as generate_text uses
        tokens[row, length - len(ids) :], mask[row, length - len(ids) :] = ids, 1
    eos = tokenizer.eos_token_id
    ours = generate.generate_tokens(
        smollm2.params,
        smollm2.spec,
        tokens,
        mask,
        max_new_tokens=48,
        eos_ids=(eos,),
        pad_id=eos,
    )
    for row, ids in enumerate(encoded):
        with torch.no_grad():
            out = smollm2_torch.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=48,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
        theirs = out[0, len(ids) :].tolist()
        assert ours[row, : len(theirs)].tolist() == theirs, (row, tokenizer.decode(theirs))
        assert len(theirs) == 48 or theirs[-1] == eos
