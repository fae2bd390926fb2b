"""Every program our users run compiles for an A100-40GB (sm_80) and an H200 (sm_90), without a GPU.

Deviceless AOT (`tsld_jax.aot`, ../shared/GPU.md): XLA:GPU's whole pipeline, Triton emitters
and ptxas included, at SmolLM2-135M's real shapes from abstract parameters. Needs the CUDA
plugin (`.ci/run` installs it). The memory analyses are printed at the end of the module.

Coverage of the train step: the configured default on both targets, both compute dtypes and
every remat mode on each target, every loss kind on one of them: seven compiles rather than
all 60 (each compile of the SmolLM2 step takes about 35 s of one core). The loss kinds differ
only in the elementwise and reduction head of the step, which XLA emits the same way for both
targets; dtype and remat change the GEMMs and the fusions, where the targets differ. The
train, evaluation and generation programs of both targets are compiled once, by one module
fixture, several at a time (`aot.compile_programs`: XLA compiles without holding the GIL); the
tests read the results.
"""

import re

import jax
import jax.numpy as jnp
import pytest

from tsld_jax import aot, sharding
from tsld_jax.models import decoder
from tsld_jax.quant.quantizers import QuantSpec

pytestmark = [
    pytest.mark.slow,
    # jax 0.10.2 writes these programs to the persistent cache but cannot read them back
    # without a GPU (INVALID_ARGUMENT); it then recompiles. See aot.compile_programs.
    pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry"),
]

TARGETS = ("a100-40gb", "h200")
SPEC = aot.SMOLLM2_135M
GB = 1e9
# target -> (loss, compute dtype, remat): the configured default first, then the other values.
DEFAULT_TRAIN = ("tsld", "float32", "dots")
TRAIN_CASES = {
    "a100-40gb": [DEFAULT_TRAIN, ("gt", "bfloat16", "none"), ("l2l", "float32", "full")],
    "h200": [
        DEFAULT_TRAIN,
        ("tsld", "bfloat16", "full"),
        ("logit", "float32", "none"),
        ("logit_gt", "bfloat16", "dots"),
    ],
}
TRAIN_KEYS = [(t, *case) for t in TARGETS for case in TRAIN_CASES[t]]
_TRITON_CALL = "__gpu$xla.gpu.triton"


EVAL_CASES = [
    ("forward", "float"),
    ("forward", "fake_quantized"),
    ("forward", "packed"),
    ("choice", "float"),
    ("choice", "packed"),
    ("prefill", "float"),
    ("prefill", "fake_quantized"),
    ("prefill", "packed"),
    ("decode", "float"),
    ("decode", "fake_quantized"),
    ("decode", "packed"),
]
_BUILDERS = {
    "forward": aot.forward_program,
    "choice": aot.choice_program,
    "prefill": aot.prefill_program,
    "decode": aot.decode_program,
}


@pytest.fixture(scope="module", params=TARGETS)
def target(request):
    return request.param


def _mesh(target):
    return aot.gpu_mesh(target, num_devices=1)


def _program(target, kind, *case):
    mesh = _mesh(target)
    if kind == "train":
        loss, dtype, remat = case
        return aot.train_step_program(SPEC, mesh, loss=loss, dtype=dtype, remat=remat)
    program, model = case
    # Packed models run in bf16, as they are deployed; the others in float32.
    dtype = jnp.bfloat16 if model == "packed" else jnp.float32
    return _BUILDERS[program](SPEC, mesh, kind=model, dtype=dtype)


@pytest.fixture(scope="module")
def compiled(request):
    """(target, "train" | "eval", *case) -> (compiled, memory), or the error compiling raised."""
    keys = [(t, "train", *case) for t, *case in TRAIN_KEYS]
    keys += [(t, "eval", *case) for t in TARGETS for case in EVAL_CASES]
    results = aot.compile_programs({key: _program(*key) for key in keys})
    yield results
    lines = ["", "XLA:GPU memory analysis (per device, deviceless compile):"]
    for (target, _, *case), result in results.items():
        if not isinstance(result, Exception):
            lines.append(f"  {target:<10} {' '.join(case):<28} {result[1]}")
    # Printed past pytest's output capture, so that passing runs show it too.
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n".join(lines))


def _result(compiled, key):
    result = compiled[key]
    if isinstance(result, Exception):
        raise result
    return result


def test_target_devices():
    devices = aot.gpu_devices("h100-80gb", num_devices=8)
    assert len(devices) == 8
    assert devices[0].device_kind == "NVIDIA H100 80GB HBM3"
    assert aot.gpu_mesh("a100-40gb", num_devices=8).shape["data"] == 8
    with pytest.raises(ValueError, match="unknown GPU target"):
        aot.gpu_devices("v100")


@pytest.mark.parametrize("rows", [4 * 511, 4 * 512, 8 * 255, 3 * 1023])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_joined_linears_backward_compiles_for_any_row_count(target, rows, dtype):
    # The shapes that failed (B*(T-1) = 2044 rows, "Couldn't find output tile sizes" in the
    # weight-gradient GEMM of the joined gate/up and q/k/v kernels) and their neighbours.
    batch = 4 if rows % 4 == 0 else 3
    x = jax.ShapeDtypeStruct((batch, rows // batch, SPEC.hidden_size), dtype)
    shapes = decoder.param_shapes(SPEC)["layers"]
    layers = {
        group: {
            name: {"kernel": jax.ShapeDtypeStruct(shape["kernel"][1:], jnp.float32)}
            for name, shape in shapes[group].items()
        }
        for group in ("attn", "mlp")
    }

    def loss(layers, x):
        q, k, v = decoder.linears(
            [layers["attn"][n] for n in "qkv"], x, ["attn/q", "attn/k", "attn/v"]
        )
        gate, up = decoder.linears(
            [layers["mlp"]["gate"], layers["mlp"]["up"]], x, ["mlp/gate", "mlp/up"]
        )
        return jnp.sum(q * q) + jnp.sum(k * v) + jnp.sum(jax.nn.silu(gate) * up)

    replicated = jax.sharding.NamedSharding(_mesh(target), jax.sharding.PartitionSpec())
    args = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), (layers, x)
    )
    aot.compile_program(aot.Program(jax.jit(jax.grad(loss, argnums=(0, 1))), args, {}))


def test_train_cases_cover_every_axis():
    losses = {loss for t in TARGETS for loss, _, _ in TRAIN_CASES[t]}
    assert losses == {"gt", "logit", "logit_gt", "tsld", "l2l"}
    for t in TARGETS:
        assert TRAIN_CASES[t][0] == DEFAULT_TRAIN
        assert {dtype for _, dtype, _ in TRAIN_CASES[t]} == {"float32", "bfloat16"}
        assert {remat for _, _, remat in TRAIN_CASES[t]} == {"dots", "full", "none"}


@pytest.mark.parametrize(
    ("target", "loss", "dtype", "remat"), TRAIN_KEYS, ids=["-".join(k) for k in TRAIN_KEYS]
)
def test_train_step_compiles(target, loss, dtype, remat, compiled):
    _, memory = _result(compiled, (target, "train", loss, dtype, remat))
    # The state: latent f32 weights and two AdamW moments, 3 x 135M x 4 bytes, donated; plus
    # the f32 teacher, except for "gt", whose program does not read it (jit drops it).
    state = 3 * 4 * 134.5e6
    teacher = 0 if loss == "gt" else 4 * 134.5e6
    assert memory.arguments == pytest.approx(state + teacher, rel=0.02)
    assert memory.aliased == pytest.approx(state, rel=0.02)
    assert memory.total < 40 * GB  # fits an A100-40GB with room to spare
    assert memory.temporaries < 8 * GB


@pytest.mark.parametrize(("program", "kind"), EVAL_CASES, ids=["-".join(c) for c in EVAL_CASES])
def test_evaluation_and_generation_compile(target, program, kind, compiled):
    result, memory = _result(compiled, (target, "eval", program, kind))
    assert memory.total < 10 * GB
    if kind == "packed":
        # "auto" picked the Pallas kernel for this GPU program although the host is a CPU.
        assert _TRITON_CALL in aot.lower(_program(target, "eval", program, kind)).as_text()
        assert "quantized_matmul_w2" in result.as_text()


def test_packed_forward_on_the_cpu_runs_xla_dot():
    cpu_mesh = sharding.make_mesh(devices=jax.devices("cpu")[:1])
    built = aot.forward_program(SPEC, cpu_mesh, kind="packed", dtype=jnp.bfloat16, batch_size=1)
    text = aot.lower(built).as_text()
    assert _TRITON_CALL not in text
    assert not re.search(r"@quantized_matmul(_\d+)?\(", text)  # only the reference


FORMATS = {
    "w2": QuantSpec("twn", 2, "channel"),
    "w4": QuantSpec("asym", 4, "group", 64),  # 576 = 9 groups of 64
    "w8": QuantSpec("sym", 8, "channel"),
}
# One launch of each shape (DECODE, DECODE_WIDE, PREFILL) per format, bf16 activations, at
# SmolLM2's widest matmul (576 -> 1536), and the float32 variants of the w2 launches.
LAUNCHES = [(name, rows, "bfloat16") for name in FORMATS for rows in (1, 64, 512)] + [
    ("w2", rows, "float32") for rows in (1, 64, 512)
]


@pytest.mark.parametrize(
    ("fmt", "rows", "dtype"), LAUNCHES, ids=[f"{f}-m{r}-{d}" for f, r, d in LAUNCHES]
)
def test_pallas_launch_compiles(target, fmt, rows, dtype):
    program = aot.quantized_matmul_program(
        FORMATS[fmt],
        _mesh(target),
        rows=rows,
        in_features=SPEC.hidden_size,
        out_features=SPEC.mlp_size,
        dtype=jnp.dtype(dtype),
    )
    compiled, _ = aot.compile_program(program)
    assert f"quantized_matmul_w{FORMATS[fmt].bits}" in compiled.as_text()
