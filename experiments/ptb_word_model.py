"""The small model of the evidence table: a GPT-2-shaped decoder with a PTB word vocabulary.

PTB (Mikolov's text) is already tokenized into a closed vocabulary of 10,000 words (`<unk>`
included) that covers its validation and test splits. The model's vocabulary is exactly those
words plus `<eos>`, which ends every line (the usual word-level PTB convention), so the embedding
table holds no token PTB never uses. The tokenizer is a `tokenizers` WordLevel model saved as a
Hugging Face `tokenizer.json`, so that train.py and eval.py load the directory like any other
model; the weights are a random GPT-2 initialisation (std 0.02) written by our own HF writer.
"""

from __future__ import annotations

import collections
import os

import jax

from tsld_jax.evaluation import perplexity
from tsld_jax.models import decoder, hf
from tsld_jax.models.spec import spec_from_hf_config

EOS = "<eos>"
UNK = "<unk>"


def ptb_vocabulary(data_dir: str) -> list[str]:
    """PTB train's words, most frequent first (ties by spelling), then `<eos>`."""
    counts = collections.Counter(
        word for line in perplexity.load_lines("ptb", "train", data_dir) for word in line.split()
    )
    words = sorted(counts, key=lambda w: (-counts[w], w))
    return words + [EOS]


def word_tokenizer(vocabulary: list[str]):
    """A fast Hugging Face tokenizer that splits on whitespace and appends `<eos>` to each text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(vocabulary)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", special_tokens=[(EOS, vocab[EOS])]
    )
    tok.decoder = decoders.WordPiece(prefix="##")  # Joins words with spaces.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=UNK, eos_token=EOS, pad_token=EOS
    )


def gpt2_config(vocab_size: int, hidden: int, layers: int, heads: int, positions: int) -> dict:
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": vocab_size,
        "n_embd": hidden,
        "n_layer": layers,
        "n_head": heads,
        "n_inner": 4 * hidden,
        "n_positions": positions,
        "n_ctx": positions,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": True,
        "bos_token_id": vocab_size - 1,
        "eos_token_id": vocab_size - 1,
    }


def build(
    directory: str,
    data_dir: str,
    *,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    positions: int = 128,
    seed: int = 0,
) -> str:
    """Writes the random initial model (config.json, model.safetensors, tokenizer) once."""
    if os.path.exists(os.path.join(directory, "model.safetensors")):
        return directory
    vocabulary = ptb_vocabulary(data_dir)
    config = gpt2_config(len(vocabulary), hidden, layers, heads, positions)
    spec = spec_from_hf_config(config)
    params = decoder.init_params(jax.random.key(seed), spec, std=0.02)
    hf.save_hf(directory, jax.device_get(params), spec, config, word_tokenizer(vocabulary))
    return directory
