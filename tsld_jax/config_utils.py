"""Validates a training config before anything is compiled; errors name the field."""

from __future__ import annotations

import math
import os

from tsld_jax.models import named
from tsld_jax.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from tsld_jax.models.decoder import REMAT_MODES

LOSS_KINDS = ("gt", "logit", "logit_gt", "l2l", "tsld")
QUANT_METHODS = ("twn", "pact", "asym", "sym", "none")
DATA_NAMES = ("auto", "ptb", "wikitext2", "gsm8k", "text", "generated", "shards")
GUARD_ACTIONS = ("stop", "warn", "off")


class ConfigError(ValueError):
    """A config value that cannot work; the message starts with the field's name."""


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config.{field}: {message}")


def _check_model_path(field: str, value: str) -> None:
    if value in named.NAMES:
        return
    looks_local = (
        value.startswith((".", "/", "~")) or value.endswith(".gguf") or (value.count("/") > 1)
    )
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if looks_local:
        _require(
            os.path.exists(os.path.expanduser(value)), field, f"model path {value!r} does not exist"
        )
    elif offline:
        _require(
            os.path.exists(value),
            field,
            f"{value!r} is not a local path and HF_HUB_OFFLINE is set; download it first",
        )


def _float_fields(config, prefix: str = ""):
    for key, value in config.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            yield from _float_fields(value, name + ".")
        elif isinstance(value, float):
            yield name, value


def _check_finite(config) -> None:
    # `--config.train.lr=inf` and `nan` parse as floats, and NaN slips through every `> 0` test
    # below with a misleading message; no float of a run may be non-finite.
    for name, value in _float_fields(config):
        _require(math.isfinite(value), name, f"must be a finite number, got {value}")


def _check_optimizer(train, guard) -> None:
    _require(train.lr > 0, "train.lr", f"must be > 0, got {train.lr}")
    # AdamW moves every weight by about lr per step whatever the gradient's size, so lr > 1
    # rewrites weights of size ~0.02-1 wholesale in one step: the model collapses to uniform
    # predictions with a finite loss (lr=1e6 did, exiting 0). Allowed on purpose by raising
    # guard.max_lr.
    _require(
        train.lr <= guard.max_lr,
        "train.lr",
        f"{train.lr} is above guard.max_lr={guard.max_lr} (AdamW moves each weight by about lr "
        "per step); raise config.guard.max_lr to run it anyway",
    )
    for field in ("b1", "b2"):
        value = train[field]
        _require(0 <= value < 1, f"train.{field}", f"must be in [0, 1), got {value}")
    _require(train.eps > 0, "train.eps", f"must be > 0, got {train.eps}")
    _require(train.steps >= 0, "train.steps", f"must be >= 0, got {train.steps}")
    _require(
        train.steps > 0 or train.epochs > 0,
        "train.epochs",
        f"must be > 0 when train.steps is 0, got {train.epochs}",
    )
    _require(
        train.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {train.warmup_steps}"
    )
    if train.steps > 0:
        _require(
            train.warmup_steps <= train.steps,
            "train.warmup_steps",
            f"{train.warmup_steps} is more than train.steps={train.steps}: the learning rate "
            "would never reach train.lr",
        )
    _require(
        train.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {train.weight_decay}"
    )
    _require(train.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables)")


def _check_guard(guard) -> None:
    _require(
        guard.action in GUARD_ACTIONS,
        "guard.action",
        f"must be one of {GUARD_ACTIONS}, got {guard.action!r}",
    )
    _require(guard.max_lr > 0, "guard.max_lr", f"must be > 0, got {guard.max_lr}")
    _require(guard.patience >= 1, "guard.patience", f"must be >= 1, got {guard.patience}")
    _require(guard.loss_rise > 0, "guard.loss_rise", f"must be > 0, got {guard.loss_rise}")
    _require(
        guard.collapse_tolerance >= 0,
        "guard.collapse_tolerance",
        f"must be >= 0, got {guard.collapse_tolerance}",
    )
    _require(
        guard.zero_grad_norm >= 0,
        "guard.zero_grad_norm",
        f"must be >= 0, got {guard.zero_grad_norm}",
    )


def _check_shard_dirs(field: str, value: str, purpose: str) -> None:
    from tsld_jax.data import shards, sources

    _require(bool(value), field, f"must name a prepare_data.py output directory {purpose}")
    try:
        corpora = shards.parse_paths(value)
    except sources.DataError as error:
        raise ConfigError(f"config.{field}: {error}") from None
    for path, _ in corpora:
        _require(os.path.isdir(path), field, f"{path!r} is not a directory")


def validate(config, weights: bool = True) -> None:
    """Raises ConfigError naming the first bad field of a train config.

    `weights=False` (`train.py --plan`, which reads architectures only) skips the check that the
    models' weights are reachable: a paper row's hub id plans offline from configs/paper.py.
    """
    _check_finite(config)
    _require(config.stage in ("fp", "qat"), "stage", f"must be 'fp' or 'qat', got {config.stage!r}")
    _require(bool(config.model.name_or_path), "model.name_or_path", "must be set")
    if weights:
        _check_model_path("model.name_or_path", config.model.name_or_path)
        if config.model.teacher:
            _check_model_path("model.teacher", config.model.teacher)

    loss, quant, train, data = config.loss, config.quant, config.train, config.data
    _require(
        loss.kind in LOSS_KINDS, "loss.kind", f"must be one of {LOSS_KINDS}, got {loss.kind!r}"
    )
    if config.stage == "fp":
        _require(loss.kind == "gt", "loss.kind", "the fp stage trains with 'gt' (no teacher)")
        _require(quant.method == "none", "quant.method", "the fp stage trains in full precision")
    _require(loss.temperature > 0, "loss.temperature", f"must be > 0, got {loss.temperature}")
    _require(loss.chunk_size >= 0, "loss.chunk_size", f"must be >= 0, got {loss.chunk_size}")

    _require(
        quant.method in QUANT_METHODS,
        "quant.method",
        f"must be one of {QUANT_METHODS}, got {quant.method!r}",
    )
    if quant.method != "none":
        _require(
            quant.granularity in ("channel", "group", "tensor"),
            "quant.granularity",
            f"must be channel, group or tensor, got {quant.granularity!r}",
        )
        if quant.granularity == "group":
            _require(
                quant.group_size > 0,
                "quant.group_size",
                f"must be > 0 with granularity 'group', got {quant.group_size}",
            )
        bits = {
            "twn": (2,),
            "pact": tuple(range(2, 9)),
            "asym": tuple(range(2, 9)),
            "sym": tuple(range(2, 9)),
        }[quant.method]
        _require(
            quant.bits in bits, "quant.bits", f"{quant.method} supports {bits}, got {quant.bits}"
        )
        _require(quant.init_scale > 0, "quant.init_scale", f"must be > 0, got {quant.init_scale}")

    _check_guard(config.guard)
    _check_optimizer(train, config.guard)
    _require(train.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {train.grad_accum}")
    _require(
        train.microbatches >= 1, "train.microbatches", f"must be >= 1, got {train.microbatches}"
    )
    stage = config.mesh.stage
    _require(stage >= 1, "mesh.stage", f"must be >= 1, got {stage}")
    if stage > 1 or train.microbatches > 1:
        _require(
            loss.kind != "l2l",
            "loss.kind",
            "l2l needs every layer's hidden states and attention probabilities, which the pipeline "
            "(mesh.stage > 1 or train.microbatches > 1) does not collect",
        )
    if config.model.name_or_path == "random" and stage > 1:
        layers = config.model.random.num_layers
        _require(
            layers % stage == 0,
            "mesh.stage",
            f"{stage} stages do not divide model.random.num_layers={layers}",
        )
    _require(
        train.remat in REMAT_MODES,
        "train.remat",
        f"must be one of {REMAT_MODES}, got {train.remat!r}",
    )
    _require(
        config.model.teacher_dtype in ("float32", "bfloat16"),
        "model.teacher_dtype",
        f"must be float32 or bfloat16, got {config.model.teacher_dtype!r}",
    )
    attention = config.model.get("attention", "auto")
    _require(
        attention in ATTENTION_IMPLEMENTATIONS,
        "model.attention",
        f"must be one of {ATTENTION_IMPLEMENTATIONS}, got {attention!r}",
    )
    _require(
        train.dtype in ("float32", "bfloat16"),
        "train.dtype",
        f"must be float32 or bfloat16, got {train.dtype!r}",
    )

    _require(
        data.name in DATA_NAMES, "data.name", f"must be one of {DATA_NAMES}, got {data.name!r}"
    )
    _require(data.block_size >= 2, "data.block_size", f"must be >= 2, got {data.block_size}")
    _require(
        data.get("bos", "line") in ("line", "block"),
        "data.bos",
        f"must be 'line' or 'block', got {data.get('bos')!r}",
    )
    _require(data.batch_size >= 1, "data.batch_size", f"must be >= 1, got {data.batch_size}")
    _require(
        data.batch_size % train.grad_accum == 0,
        "train.grad_accum",
        f"must divide data.batch_size={data.batch_size}, got {train.grad_accum}",
    )
    micro = data.batch_size // max(train.grad_accum, 1)
    _require(
        micro % max(train.microbatches, 1) == 0,
        "train.microbatches",
        f"must divide the per-step micro-batch data.batch_size / train.grad_accum = {micro}, "
        f"got {train.microbatches}",
    )
    if data.dir:
        _require(os.path.isdir(data.dir), "data.dir", f"{data.dir!r} is not a directory")
    if data.name == "text":
        _require(bool(data.path), "data.path", "must name a .txt or .jsonl file for data.name=text")
        _require(
            os.path.isfile(data.path),
            "data.path",
            f"{data.path!r} is a directory, not a file"
            if os.path.isdir(data.path)
            else f"{data.path!r} does not exist",
        )
    if data.name == "shards":
        _check_shard_dirs("data.path", data.path, "for data.name=shards")
    if data.get("eval_path", ""):
        _check_shard_dirs("data.eval_path", data.eval_path, "")
        _require(
            "," not in data.eval_path, "data.eval_path", "names one shard directory (no weights)"
        )
    _require(data.get("workers", 1) >= 1, "data.workers", "must be >= 1")
    _require(
        not data.get("document_attention", False) or data.name == "shards",
        "data.document_attention",
        f"needs data.name=shards (the loader that knows where documents end), not {data.name!r}",
    )
    _require(data.eval_blocks >= 0, "data.eval_blocks", "must be >= 0 (0: all)")
    _require(
        data.generated_temperature >= 0,
        "data.generated_temperature",
        f"must be >= 0 (0: greedy), got {data.generated_temperature}",
    )
    _require(
        data.generated_sequences >= data.batch_size,
        "data.generated_sequences",
        f"must be >= data.batch_size={data.batch_size}",
    )

    if config.model.name_or_path == named.RANDOM:
        random = config.model.random
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
            _require(
                random[field] >= 1, f"model.random.{field}", f"must be >= 1, got {random[field]}"
            )
        _require(
            random.hidden_size % random.num_heads == 0,
            "model.random.num_heads",
            f"must divide model.random.hidden_size={random.hidden_size}, got {random.num_heads}",
        )
        _require(
            random.init_std > 0, "model.random.init_std", f"must be > 0, got {random.init_std}"
        )

    _require(config.checkpoint.every_steps >= 1, "checkpoint.every_steps", "must be >= 1")
    _require(config.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    _require(config.eval.every_steps >= 0, "eval.every_steps", "must be >= 0")
    _require(config.eval.patience >= 0, "eval.patience", "must be >= 0")
    _require(
        config.eval.patience == 0 or config.eval.every_steps > 0,
        "eval.patience",
        "early stopping needs periodic evaluations: set eval.every_steps > 0",
    )
    _require(config.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    _require(config.log.every_steps >= 1, "log.every_steps", "must be >= 1")
    for axis in ("data", "fsdp", "tensor"):
        size = config.mesh[axis]
        _require(size == -1 or size >= 1, f"mesh.{axis}", f"must be >= 1 or -1, got {size}")
    if config.profile.steps:
        parts = str(config.profile.steps).split(",")
        ok = len(parts) == 2 and all(p.strip().isdigit() for p in parts)
        _require(
            ok and int(parts[0]) <= int(parts[1]),
            "profile.steps",
            f"must be 'a,b' with a <= b, got {config.profile.steps!r}",
        )


def validate_mesh(config, device_count: int) -> None:
    """Raises ConfigError when the mesh does not fit `device_count` devices or the batch does not
    split over it; needs no compilation, so the trainer calls it before loading anything."""
    stage = config.mesh.stage
    _require(
        device_count % stage == 0,
        "mesh.stage",
        f"{stage} stages do not divide the {device_count} devices",
    )
    device_count //= stage  # what each stage has for data x fsdp x tensor
    sizes = {axis: config.mesh[axis] for axis in ("data", "fsdp", "tensor")}
    fixed = math.prod(size for size in sizes.values() if size != -1)
    free = [axis for axis, size in sizes.items() if size == -1]
    _require(len(free) <= 1, f"mesh.{free[-1] if free else 'data'}", "only one axis may be -1")
    _require(
        device_count % fixed == 0,
        "mesh",
        f"data x fsdp x tensor = {fixed} does not divide the {device_count} devices of each of "
        f"the {stage} stages",
    )
    for axis in free:
        sizes[axis] = device_count // fixed
    _require(
        math.prod(sizes.values()) == device_count,
        "mesh",
        f"stage x data x fsdp x tensor = {stage * math.prod(sizes.values())} but there are "
        f"{device_count * stage} devices",
    )
    data, train = config.data, config.train
    micro = data.batch_size // train.grad_accum
    ways = sizes["data"] * sizes["fsdp"]
    _require(
        micro % ways == 0,
        "data.batch_size",
        f"{data.batch_size} (per micro-batch {micro}) must divide over the {ways} data x fsdp "
        "devices of the mesh",
    )
    rows = micro // train.microbatches
    _require(
        rows % ways == 0,
        "train.microbatches",
        f"{train.microbatches} microbatches of {micro} rows leave {rows} per microbatch, which "
        f"does not divide over the {ways} data x fsdp devices of the mesh",
    )


def validate_pipeline(config, num_layers: int) -> None:
    """Raises ConfigError when the model's layers do not split into config.mesh.stage stages."""
    stage = config.mesh.stage
    _require(
        num_layers % stage == 0,
        "mesh.stage",
        f"{stage} stages do not divide the model's {num_layers} layers",
    )


def profile_range(config) -> tuple[int, int] | None:
    if not config.profile.steps:
        return None
    first, last = (int(p) for p in str(config.profile.steps).split(","))
    return first, last
