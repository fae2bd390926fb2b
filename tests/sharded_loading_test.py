"""Sharded loading: safetensors into final shardings on the 8 fake CPU devices."""

import jax
import numpy as np
import pytest
import tiny_models

from tsld_jax import sharding
from tsld_jax.models import load_model
from tsld_jax.models.sharded import load_hf_sharded


@pytest.mark.parametrize(
    "family",
    [
        "gpt2",
        "opt_pre",
        "opt_post_proj",
        "llama_gqa_untied",
        "llama_tied",
        "gpt_neo_local",
        "qwen3",  # q/k norms
        "gemma3",  # post norms
        "phi3",  # qkv_proj and gate_up_proj sliced per part (axis 0, unlike GPT-2's c_attn)
    ],
)
def test_sharded_load_equals_full_load(family, tmp_path, mesh_devices):
    tiny_models.save(family, str(tmp_path))
    full = load_model(str(tmp_path), load_tokenizer=False)
    mesh = sharding.make_mesh(1, 4, 2, devices=mesh_devices[:8])
    shardings = sharding.param_shardings(full.params, mesh)
    params = load_hf_sharded(str(tmp_path), full.spec, shardings)
    for (path, got), want, s in zip(
        jax.tree_util.tree_flatten_with_path(params)[0],
        jax.tree.leaves(full.params),
        jax.tree.leaves(shardings),
        strict=True,
    ):
        assert got.sharding == s, path
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(path))
    # Each device holds its shard only: the up/fc kernels are split 4 x 2 ways.
    kernel = params["layers"]["mlp"]["up"]["kernel"]
    assert kernel.addressable_shards[0].data.size == kernel.size // 8
