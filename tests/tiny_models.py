"""Tiny random `transformers` models of every family, saved as local HF directories.

PyTorch is imported only by `build`, which returns a transformers model to compare against: a
test that needs one skips where torch is absent (the GPU machines' Python 3.12 CI venvs). A test
that only needs a model directory calls `save`, which works without torch.
"""

import numpy as np
import pytest
import transformers

from tsld_jax.models import decoder, hf
from tsld_jax.models.spec import spec_from_hf_config

# Large init range so a wrong detail moves the logits far beyond the tolerance.
_INIT = 0.2
VOCAB = 97

# The rotary families' shared tiny shape.
_ROTARY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    initializer_range=_INIT,
)
# Phi3Config's default special ids (32000) lie beyond the tiny vocabulary.
_PHI3 = dict(**_ROTARY, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=_INIT
    ),
    "opt_pre": lambda: transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=48,
        num_attention_heads=4,
        max_position_embeddings=64,
        init_std=_INIT,
        pad_token_id=1,
    ),
    "opt_post_proj": lambda: transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=48,
        num_attention_heads=4,
        max_position_embeddings=64,
        init_std=_INIT,
        do_layer_norm_before=False,
        word_embed_proj_dim=16,
        pad_token_id=1,
    ),
    "llama_gqa_untied": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        initializer_range=_INIT,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    ),
    "llama_tied": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        initializer_range=_INIT,
    ),
    # Llama 3.1/3.2's rescaled frequencies: with head_dim 8, theta 500 and an original context
    # of 64, one frequency is kept, one interpolated and two divided by the factor.
    "llama3_gqa_untied": lambda: transformers.LlamaConfig(
        **_ROTARY,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_parameters=_LLAMA3_ROPE,
    ),
    "llama3_tied": lambda: transformers.LlamaConfig(
        **_ROTARY, num_key_value_heads=1, tie_word_embeddings=True, rope_parameters=_LLAMA3_ROPE
    ),
    "mistral_window": lambda: transformers.MistralConfig(
        **_ROTARY, num_key_value_heads=2, sliding_window=3, tie_word_embeddings=False
    ),
    # Qwen2's q/k/v biases; the second layer slides a window of 3 (max_window_layers=1).
    "qwen2_window": lambda: transformers.Qwen2Config(
        **_ROTARY,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        use_sliding_window=True,
        sliding_window=3,
        max_window_layers=1,
    ),
    # Qwen3: q/k norms over an explicit head_dim (16) that differs from hidden / heads (8).
    "qwen3": lambda: transformers.Qwen3Config(
        **_ROTARY, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False
    ),
    # Gemma 3: a local layer (window 3, RoPE base 10) then a global one (base 1000, linear
    # scaling 2), query_pre_attn_scalar 12 (not head_dim), (1 + w) norms, post norms, GeGLU.
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **_ROTARY,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=12,
        sliding_window=3,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
        },
    ),
    # Gemma 2: soft-capped scores (5) and logits (3), small enough to bend them.
    "gemma2_softcap": lambda: transformers.Gemma2Config(
        **_ROTARY,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=12,
        sliding_window=3,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
    ),
    # Phi-3: fused qkv_proj and gate_up_proj (split on import), GQA, a window on every layer.
    "phi3_window": lambda: transformers.Phi3Config(
        **_PHI3, num_key_value_heads=2, sliding_window=3
    ),
    "phi3": lambda: transformers.Phi3Config(**_PHI3, num_key_value_heads=4),
    "gpt_neo_local": lambda: transformers.GPTNeoConfig(
        vocab_size=VOCAB,
        max_position_embeddings=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        window_size=3,
        initializer_range=_INIT,
    ),
}


def build(name: str, directory: str, seed: int = 0):
    """Builds a random model, perturbs its norms and biases, and saves it; returns the model."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name]())
    with torch.no_grad():
        # Default inits leave norms at 1 and biases at 0: perturb them so their mapping is tested.
        for pname, p in model.named_parameters():
            if "norm" in pname or "ln_" in pname or pname.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(directory)
    return model


def save(name: str, directory: str, seed: int = 0) -> None:
    """Saves a random model as `build` does, with PyTorch where it is installed (the same weights
    as `build`), else with numpy through our own exporter (other random weights, same layout)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        build(name, directory, seed)
        return
    save_numpy(name, directory, seed)


def save_numpy(name: str, directory: str, seed: int = 0, **overrides) -> None:
    """Saves a random model of CONFIGS[name] (its fields changed by `overrides`) without PyTorch,
    through our own exporter."""
    hf_config = CONFIGS[name]().to_dict() | overrides
    spec = spec_from_hf_config(hf_config)
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        if path[-1] == "scale":
            return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        if path[-1] == "bias":
            return (0.1 * rng.standard_normal(shape)).astype(np.float32)
        return (_INIT * rng.standard_normal(shape)).astype(np.float32)

    def walk(tree, path=()):
        if isinstance(tree, tuple):
            return leaf(path, tree)
        return {key: walk(value, (*path, key)) for key, value in tree.items()}

    hf.save_hf(directory, walk(decoder.param_shapes(spec)), spec, hf_config)


def save_bpe_tokenizer(directory: str, text: str, vocab_size: int):
    """A byte-level BPE (GPT-2 style, `<|endoftext|>` its BOS and EOS) trained on `text`, saved
    beside a model; returns the transformers tokenizer."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=vocab_size, special_tokens=["<|endoftext|>"])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    fast.save_pretrained(directory)
    return fast


def save_word_tokenizer(directory: str, words: list[str]) -> None:
    """A whitespace word-level tokenizer over `words` (id 0 is <unk>), saved beside a model."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")
    fast.save_pretrained(directory)


def llama_spec(**overrides):
    """A tiny LLaMA-family ModelSpec for JAX-only tests (no transformers model behind it)."""
    from tsld_jax.models.spec import ModelSpec

    fields = dict(
        family="llama",
        vocab_size=16,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        mlp_size=24,
        norm="rmsnorm",
        activation="silu",
        gated_mlp=True,
        positional="rotary",
        attn_bias=False,
        attn_out_bias=False,
        mlp_bias=False,
        tie_embeddings=False,
    )
    fields.update(overrides)
    return ModelSpec(**fields)
