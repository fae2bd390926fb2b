"""A training config turned into the pieces of its run: the models, the quantization rules, the
student's starting parameters and the shape of the train state.

Shared by the trainer and by everything that reads a run back (checkpoint restore, eval.py), so
that both build the very same abstract state from a run's config.json.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from tsld_jax import config_utils, train_step
from tsld_jax.models import decoder, load_model, named
from tsld_jax.models.loading import LoadedModel
from tsld_jax.models.spec import ModelSpec
from tsld_jax.quant import rules as rules_lib
from tsld_jax.quant.quantizers import QuantSpec


def load_named_or_path(name: str, cfg, seed: int) -> LoadedModel:
    """`load_model(name)`, or for "random" a model of the config's `model.random` size; its
    spec runs attention as `model.attention` says."""
    if name == named.RANDOM:
        spec = with_attention(named.random_spec(cfg.model.random), cfg)
        params = decoder.init_params(jax.random.key(seed), spec, std=cfg.model.random.init_std)
        return LoadedModel(
            params, spec, named.random_hf_config(spec), named.ByteTokenizer(), named.RANDOM
        )
    model = load_model(name)
    return dataclasses.replace(model, spec=with_attention(model.spec, cfg))


def with_attention(spec: ModelSpec, cfg) -> ModelSpec:
    """`spec` with the config's `model.attention` (absent in older runs' configs: "auto")."""
    return dataclasses.replace(spec, attention=cfg.model.get("attention", "auto"))


def load_models(cfg, teacher: bool = True) -> tuple[LoadedModel, LoadedModel | None]:
    """The student's starting point and (for QAT) the teacher, as the config names them."""
    student = load_named_or_path(cfg.model.name_or_path, cfg, cfg.seed)
    if not teacher or cfg.stage == "fp":
        return student, None
    teacher_name = cfg.model.teacher or cfg.model.name_or_path
    if teacher_name == cfg.model.name_or_path:
        # The same weights: share the read-only arrays instead of loading twice.
        return student, student
    teacher_model = load_named_or_path(teacher_name, cfg, cfg.seed)
    if teacher_model.spec.vocab_size != student.spec.vocab_size:
        raise config_utils.ConfigError(
            "config.model.teacher: its vocabulary differs from the student's "
            f"({teacher_model.spec.vocab_size} vs {student.spec.vocab_size})"
        )
    return student, teacher_model


TEACHER_DTYPES = train_step.DTYPES


def teacher_params(teacher_params, cfg, shardings=None):
    """The teacher's parameters as the train step takes them: in `model.teacher_dtype`, and when
    `shardings` (from `sharding.param_shardings`) is given, placed there, each device receiving
    only its shard (not replicated: the step jits them with these shardings)."""
    dtype = TEACHER_DTYPES[cfg.model.teacher_dtype]

    def one(x, s=None):
        if s is None:
            return x.astype(dtype)
        x = jax.device_put(x, s)
        # Cast shard by shard, on the devices: never a whole cast copy on one device.
        return x if x.dtype == dtype else jax.jit(lambda a: a.astype(dtype), out_shardings=s)(x)

    if shardings is None:
        return jax.tree.map(one, teacher_params)
    return jax.tree.map(one, teacher_params, shardings)


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


def abstract_state(cfg, params, total_steps: int) -> tuple[Any, Any, Any]:
    """(abstract TrainState, optimizer, lr schedule) of a run; nothing is allocated."""
    optimizer, schedule = train_step.make_optimizer(cfg.train, max(total_steps, 1))
    abstract = jax.eval_shape(lambda p: train_step.init_state(p, optimizer, cfg.seed), params)
    return abstract, optimizer, schedule
