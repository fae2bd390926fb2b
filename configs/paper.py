"""The authors' recipe table (PAPER.md, "Training recipe"): one row per model, and the same
recipe for four of today's models (Llama-3.2-1B, Qwen3-0.6B, Qwen2.5-1.5B, Gemma-3-270M).

Each `<model>_fp.py` / `<model>_tsld.py` file is `paper.config(model, stage)`; this file holds
the numbers once.
"""

from configs import base

# model: (hub id, FP learning rate, FP epochs, QAT learning rate, QAT epochs)
TABLE = {
    "gpt2_0.1b": ("gpt2", 1e-4, 3, 1e-4, 90),
    "gpt2_0.3b": ("gpt2-medium", 1e-4, 3, 1e-4, 60),
    "gpt2_0.6b": ("gpt2-large", 1e-4, 3, 1e-4, 30),
    "gpt2_1.5b": ("gpt2-xl", 1e-4, 3, 1e-4, 30),
    "opt0.1b": ("facebook/opt-125m", 1e-4, 3, 1e-4, 90),
    "opt1.3b": ("facebook/opt-1.3b", 1e-4, 3, 1e-4, 30),
    "opt2.7b": ("facebook/opt-2.7b", 5e-5, 3, 5e-5, 30),
    "opt6.7b": ("facebook/opt-6.7b", 5e-5, 3, 5e-5, 10),
    "gpt_neo1.3b": ("EleutherAI/gpt-neo-1.3B", 1e-4, 3, 1e-4, 30),
    "llama7b": ("huggyllama/llama-7b", 5e-5, 1, 7e-5, 5),
    # Today's models (not in the paper; learning rates and epochs are ours, in line with the
    # rows above: lr 1e-4 below 1B parameters and 5e-5 from 1B on, FP and QAT alike; FP 3
    # epochs; QAT epochs those of the paper's row of similar size: GPT-2-medium (0.35B) for
    # Gemma-3-270M, GPT-2-large (0.77B) for Qwen3-0.6B, OPT-1.3B / GPT-2-XL for the 1.2-1.5B).
    "llama3.2_1b": ("meta-llama/Llama-3.2-1B", 5e-5, 3, 5e-5, 30),
    "qwen3_0.6b": ("Qwen/Qwen3-0.6B", 1e-4, 3, 1e-4, 30),
    "qwen2.5_1.5b": ("Qwen/Qwen2.5-1.5B", 5e-5, 3, 5e-5, 30),
    # "gemma3-270m": the project's named GGUF model (`models/named.py`), the real Gemma-3-270M.
    "gemma3_270m": ("gemma3-270m", 1e-4, 3, 1e-4, 60),
}


# Mesh settings per hardware target, chosen from `train.py --plan` (docs/scaling.md). The batch
# of 4 sequences splits over data x fsdp, so on 8 devices at most 4 of them shard the batch and
# the other factor is tensor parallelism (heads, MLP width, vocabulary). Per-row overrides below.
TARGETS = {
    "": {},
    "8xa100": {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2},
    "1xh100": {"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1},
    # Cloud TPU slices, by their accelerator type: v5p-8 is 8 TensorCores, 4 chips (one JAX
    # device each), v6e-8 is 8 chips.
    "v5p-8": {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 1},
    "v6e-8": {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2},
}
# (model, stage, target) -> extra settings where the target's defaults do not fit.
TARGET_OVERRIDES: dict[tuple[str, str, str], dict] = {}
# model -> extra settings of every stage and target. Gemma is trained with a BOS opening every
# sequence and never saw its <unk> token: one BOS per block, PTB's "<unk>" as text
# (docs/gemma3_gguf.md).
ROW_OVERRIDES: dict[str, dict] = {"gemma3_270m": {"data.bos": "block"}}


def config(model: str, stage: str, target: str = ""):
    """PTB, batch 4 x 512, AdamW with linear decay, fp32; `stage` is "fp" or "tsld".

    The FP stage fine-tunes with the gt loss and writes the teacher to WORKDIR/export; the TSLD
    stage starts from it: --config.model.name_or_path=FP_WORKDIR/export. `target` picks the
    mesh (and where needed remat and teacher dtype) that fits that hardware (TARGETS).
    """
    if target not in TARGETS:
        raise ValueError(f"unknown config target {target!r}; expected one of {sorted(TARGETS)}")
    hub_id, fp_lr, fp_epochs, qat_lr, qat_epochs = TABLE[model]
    c = base.get_config()
    c.model.name_or_path = hub_id
    c.data.name = "ptb"
    c.data.block_size = 512
    c.data.batch_size = 4
    if stage == "fp":
        c.stage, c.loss.kind, c.quant.method = "fp", "gt", "none"
        c.train.lr, c.train.epochs = fp_lr, fp_epochs
    else:
        c.stage, c.loss.kind = "qat", "tsld"
        c.quant.method, c.quant.bits = "twn", 2
        c.train.lr, c.train.epochs = qat_lr, qat_epochs
    settings = ROW_OVERRIDES.get(model, {}) | TARGETS[target]
    settings |= TARGET_OVERRIDES.get((model, stage, target), {})
    for field, value in settings.items():
        section, name = field.split(".")
        c[section][name] = value
    return c


def _gpt2(d, layers, heads):
    return {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024} | {
        "n_embd": d,
        "n_layer": layers,
        "n_head": heads,
    }


def _opt(d, layers, heads, ffn):
    return {"model_type": "opt", "vocab_size": 50272, "max_position_embeddings": 2048} | {
        "hidden_size": d,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "ffn_dim": ffn,
        "do_layer_norm_before": True,
        "word_embed_proj_dim": d,
    }


# The Hugging Face config.json fields the decoder reads (models/spec.py's spec_from_hf_config),
# per hub id of TABLE: `train.py --plan` builds the architecture from these without the
# weights or the network (values from each model's config.json on the hub).
HF_CONFIGS = {
    "gpt2": _gpt2(768, 12, 12),
    "gpt2-medium": _gpt2(1024, 24, 16),
    "gpt2-large": _gpt2(1280, 36, 20),
    "gpt2-xl": _gpt2(1600, 48, 25),
    "facebook/opt-125m": _opt(768, 12, 12, 3072),
    "facebook/opt-1.3b": _opt(2048, 24, 32, 8192),
    "facebook/opt-2.7b": _opt(2560, 32, 32, 10240),
    "facebook/opt-6.7b": _opt(4096, 32, 32, 16384),
    "EleutherAI/gpt-neo-1.3B": {
        "model_type": "gpt_neo",
        "vocab_size": 50257,
        "hidden_size": 2048,
        "num_layers": 24,
        "num_heads": 16,
        "max_position_embeddings": 2048,
        "attention_types": [[["global", "local"], 12]],
        "window_size": 256,
        "intermediate_size": None,
        "activation_function": "gelu_new",
    },
    "huggyllama/llama-7b": {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "intermediate_size": 11008,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    },
    # Today's rows. Rotary models read no max_position_embeddings; it is kept where given, as
    # the hub's config.json has it. Sizes: 1.236B, 0.596B (0.440B without the embedding),
    # 1.544B and 0.268B parameters (tests/configs_test.py counts them).
    "meta-llama/Llama-3.2-1B": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
    },
    "Qwen/Qwen3-0.6B": {
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "attention_bias": False,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "max_position_embeddings": 40960,
        "use_sliding_window": False,
        "sliding_window": None,
        "tie_word_embeddings": True,
    },
    "Qwen/Qwen2.5-1.5B": {
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
    },
    # Gemma-3-270M's config.json (google/gemma-3-270m; the GGUF's metadata agrees): every 6th
    # layer global (full attention, rope_theta), the others local (a 512-token window, their
    # own rope base rope_local_base_freq).
    "gemma3-270m": {
        "model_type": "gemma3_text",
        "vocab_size": 262144,
        "hidden_size": 640,
        "intermediate_size": 2048,
        "num_hidden_layers": 18,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "sliding_window": 512,
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": None,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
    },
}
