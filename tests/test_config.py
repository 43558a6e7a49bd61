"""Tests for linbias.config: validation, presets, dict/JSON round-trip."""

from __future__ import annotations

import dataclasses
import json

import pytest

from linbias.config import POSITIONS, PRESETS, ModelConfig, model_config


def test_defaults_and_derived_widths() -> None:
    c = ModelConfig()
    assert (c.vocab_size, c.n_layers, c.n_heads, c.d_model, c.train_len) == (4096, 4, 4, 128, 128)
    assert c.position == "alibi" and c.d_ff is None
    assert c.ff_dim == 512 and c.head_dim == 32
    assert ModelConfig(d_ff=100).ff_dim == 100


def test_frozen_and_keyword_only() -> None:
    c = ModelConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.n_layers = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        ModelConfig(4096)  # type: ignore[misc]


@pytest.mark.parametrize(
    "config",
    [ModelConfig(), ModelConfig(d_ff=77, position="t5", dropout=0.1, tie_weights=False),
     *(model_config(name) for name in PRESETS)],
)
def test_json_round_trip(config: ModelConfig) -> None:
    text = config.to_json()
    assert json.loads(text) == config.to_dict()
    assert ModelConfig.from_json(text) == config
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_from_dict_names_unknown_keys() -> None:
    with pytest.raises(ValueError, match="block_size") as err:
        ModelConfig.from_dict({"n_layers": 2, "block_size": 64, "wpe": 1})
    assert "wpe" in str(err.value) and "train_len" in str(err.value)  # lists valid keys too


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_model=130, n_heads=4), "divisible by n_heads"),
        (dict(n_layers=0), "n_layers must be a positive integer"),
        (dict(train_len=-1), "train_len"),
        (dict(vocab_size=True), "vocab_size"),
        (dict(n_heads=2.0), "n_heads"),
        (dict(d_ff=0), "d_ff"),
        (dict(dropout=1.0), "dropout"),
        (dict(alibi_max_bias=0.0), "alibi_max_bias"),
        (dict(rotary_base=-1.0), "rotary_base"),
        (dict(position="rotary", d_model=12, n_heads=4), "even head dim"),
        (dict(t5_buckets=32, t5_max_distance=16), "t5_max_distance"),
    ],
)
def test_validation_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_unknown_position_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="xpos") as err:
        ModelConfig(position="xpos")
    assert all(name in str(err.value) for name in POSITIONS)
    assert set(POSITIONS) == {"none", "sinusoidal", "learned", "rotary", "t5", "alibi"}


def test_presets_exact_names_and_overrides() -> None:
    assert list(PRESETS) == ["tiny", "small", "base"]
    small = model_config("small")
    assert (small.n_layers, small.n_heads, small.d_model) == (4, 8, 256)
    base = model_config("base", position="rotary", train_len=512)
    assert (base.n_layers, base.n_heads, base.d_model) == (6, 8, 512)
    assert (base.position, base.train_len) == ("rotary", 512)
    assert model_config("tiny", n_layers=3).n_layers == 3
    assert PRESETS["tiny"]["n_layers"] == 2  # overrides do not mutate the preset


def test_unknown_preset_and_override_errors() -> None:
    with pytest.raises(ValueError, match="valid presets: tiny, small, base"):
        model_config("Small")  # exact names only
    with pytest.raises(ValueError, match="n_layer"):
        model_config("tiny", n_layer=3)
