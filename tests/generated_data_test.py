"""Teacher samples cached in the workdir are keyed by what produced them, and sampled afresh
when that changes (another teacher, new weights at the same path, other sampling settings)."""

import jax
import ml_collections
import numpy as np
import pytest

from tsld_jax import generated_data
from tsld_jax.models import decoder, named


def _teacher(seed):
    spec = named.random_spec(
        ml_collections.ConfigDict(
            dict(
                vocab_size=256,
                hidden_size=32,
                num_layers=1,
                num_heads=4,
                num_kv_heads=2,
                mlp_size=64,
            )
        )
    )
    return decoder.init_params(jax.random.key(seed), spec, std=0.2), spec


@pytest.fixture
def sampled(monkeypatch):
    calls = []

    def fake_sample(params, spec, count, length, temperature, seed, first, **kwargs):
        calls.append((count, length, temperature))
        return np.full((count, length), len(calls), np.int32)

    monkeypatch.setattr(generated_data, "sample", fake_sample)
    return calls


def test_fingerprint_follows_the_weights():
    a, b = _teacher(0), _teacher(1)
    assert generated_data.teacher_fingerprint(*a) == generated_data.teacher_fingerprint(
        *_teacher(0)
    )
    assert generated_data.teacher_fingerprint(*a) != generated_data.teacher_fingerprint(*b)


def test_cache_is_rebuilt_when_what_made_it_changes(tmp_path, sampled, capsys):
    cfg = ml_collections.ConfigDict(
        dict(generated_sequences=3, eval_blocks=1, block_size=8, generated_temperature=1.0)
    )
    teacher = _teacher(0)
    first = generated_data.load_or_sample(cfg, None, teacher, str(tmp_path), "train")
    again = generated_data.load_or_sample(cfg, None, teacher, str(tmp_path), "train")
    assert len(sampled) == 1 and (first == again).all()
    generated_data.load_or_sample(cfg, None, _teacher(1), str(tmp_path), "train")
    assert len(sampled) == 2
    assert "sampling afresh" in capsys.readouterr().out
    cfg.generated_temperature = 0.7
    generated_data.load_or_sample(cfg, None, _teacher(1), str(tmp_path), "train")
    assert len(sampled) == 3
    assert "temperature 1.0 -> 0.7" in capsys.readouterr().out
    # A cache from before caches were keyed is not trusted.
    np.savez(tmp_path / "generated_train.npz", tokens=np.zeros((3, 8), np.int32))
    tokens = generated_data.load_or_sample(cfg, None, _teacher(1), str(tmp_path), "train")
    assert len(sampled) == 4 and (tokens == 4).all()
