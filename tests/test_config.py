"""Tests for linbias.config: validation, presets, dict/JSON round-trip."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest

from linbias.positions import POSITION_METHODS

from linbias.config import (
    PRESETS,
    ConfigBase,
    ModelConfig,
    TrainConfig,
    check_positive_float,
    model_config,
)


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
        (dict(position_scale=0.0), "position_scale must be a finite positive number"),
        (dict(position="t5", position_scale=0.5), "applies to rotary and alibi positions only"),
        (dict(position="learned", position_scale=0.5), "not 'learned': leave it at 1"),
    ],
)
def test_validation_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("name", ["xpos", "ALiBi"])  # exact names: no case folding
def test_unknown_position_lists_valid_names(name: str) -> None:
    with pytest.raises(ValueError, match=f"unknown position method '{name}'; valid: ") as err:
        ModelConfig.from_dict({"position": name})
    names = {"none", "sinusoidal", "learned", "rotary", "t5", "alibi"}
    assert all(name in str(err.value) for name in names)
    assert set(POSITION_METHODS) == names  # the one registry the config checks against


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


# --- field types: checked, never coerced ---------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("tie_weights", "no", "a bool"),  # truthy: would have tied the weights
        ("tie_weights", 0, "a bool"),
        ("bias", 1, "a bool"),
        ("dropout", "0.1", "a finite number"),
        ("dropout", math.nan, "a finite number"),
        ("d_ff", 2.0, "an integer or None"),
        ("d_ff", True, "an integer or None"),
        ("n_layers", "2", "an integer"),
        ("vocab_size", 4096.0, "an integer"),
        ("position", 3, "a string"),
        ("alibi_max_bias", "8", "a finite number"),
        ("alibi_max_bias", math.inf, "a finite number"),
        ("rotary_base", math.nan, "a finite number"),
        ("train_len", None, "an integer"),
        ("t5_buckets", [32], "an integer"),
    ],
)
def test_from_dict_rejects_wrong_types(field: str, value: object, expected: str) -> None:
    for build in (lambda: ModelConfig.from_dict({field: value}),
                  lambda: ModelConfig(**{field: value})):
        with pytest.raises(ValueError) as err:
            build()
        message = str(err.value)
        assert f"ModelConfig.{field} must be {expected}" in message
        assert f"got {value!r} ({type(value).__name__})" in message


def test_json_nan_and_infinity_are_rejected() -> None:
    for literal in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(ValueError, match="rotary_base must be a finite number"):
            ModelConfig.from_json(f'{{"rotary_base": {literal}}}')


def test_numbers_are_normalised_not_reinterpreted() -> None:
    c = ModelConfig(alibi_max_bias=8, rotary_base=np.float64(500.0), n_layers=np.int64(3))
    assert type(c.alibi_max_bias) is float and c.alibi_max_bias == 8.0
    assert type(c.rotary_base) is float and type(c.n_layers) is int and c.n_layers == 3
    assert json.loads(c.to_json())["n_layers"] == 3  # numpy scalars would not serialise


def test_from_dict_needs_a_dict() -> None:
    for not_a_dict in ([("n_layers", 2)], "n_layers=2", None):
        with pytest.raises(ValueError, match="ModelConfig must be a dict"):
            ModelConfig.from_dict(not_a_dict)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [math.inf, math.nan, -math.inf, 0.0, True, "1"])
def test_check_positive_float_needs_a_finite_positive_number(value: object) -> None:
    with pytest.raises(ValueError, match="x must be a finite positive number"):
        check_positive_float("x", value)
    check_positive_float("x", 1e-300)


@pytest.mark.parametrize(
    "field, value",
    [("data", 3), ("data", None), ("bf16", "false"), ("lr", math.inf), ("lr", math.nan),
     ("weight_decay", math.nan), ("grad_clip", math.inf), ("steps", 10.0), ("seed", True),
     ("min_lr_ratio", "0.1")],
)
def test_train_config_fields_are_checked_too(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        TrainConfig.from_dict({field: value})
    with pytest.raises(ValueError, match=field):
        TrainConfig.from_json(json.dumps({field: value}))  # through JSON (nan as NaN)


def test_reproduce_preset_tuples_from_json_lists() -> None:
    from linbias.config import REPRODUCE_PRESETS, ReproducePreset

    preset = REPRODUCE_PRESETS["quick"]
    again = ReproducePreset.from_json(preset.to_json())  # JSON turns the tuple into a list
    assert again == preset and isinstance(again.multiples, tuple)
    assert ReproducePreset.from_dict({**preset.to_dict(), "multiples": [1, 3]}).multiples == (1, 3)
    with pytest.raises(ValueError, match="ReproducePreset needs model, train_len"):
        ReproducePreset.from_dict({"steps": 10, "batch_size": 2})  # not a TypeError
    for bad in ("124", [1, "2"], [1.0], [True], 4, None):
        with pytest.raises(ValueError, match="ReproducePreset.multiples must be a list whose "
                                             "items are each an integer"):
            ReproducePreset.from_dict({**preset.to_dict(), "multiples": bad})


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Other(ConfigBase):
    """A config of another module, whose own __post_init__ does not call super()."""

    name: str = "x"
    sizes: tuple[int, ...] = (1,)
    pair: tuple[int, str] = (1, "a")
    scale: float | None = None
    seen: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.name) > 10:
            raise ValueError("name too long")


def test_any_config_subclass_is_checked() -> None:
    assert _Other(sizes=[2, 3], pair=[4, "b"]).sizes == (2, 3)
    assert _Other(pair=[4, "b"]).pair == (4, "b")
    for kwargs, match in [
        (dict(name=5), "_Other.name must be a string, got 5"),  # before len() would fail
        (dict(pair=[1, 2]), "_Other.pair must be a list of 2: an integer, a string"),
        (dict(pair=[1]), "_Other.pair"),
        (dict(scale=math.inf), "_Other.scale must be a finite number or None"),
        (dict(seen="abc"), "_Other.seen must be a list whose items are each a string"),
        (dict(seen=[1]), "_Other.seen must be a list whose items are each a string"),
    ]:
        with pytest.raises(ValueError, match=re.escape(match)):
            _Other(**kwargs)
    with pytest.raises(ValueError, match="name too long"):  # its own check still runs
        _Other(name="a" * 11)


# --- TrainConfig ---------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("lr", float("inf")), ("lr", float("nan")), ("lr", 0.0), ("lr", "0.1"),
    ("min_lr_ratio", float("nan")), ("min_lr_ratio", 1.5), ("min_lr_ratio", "0.1"),
    ("weight_decay", float("nan")), ("weight_decay", float("inf")), ("weight_decay", -0.1),
    ("grad_clip", float("inf")), ("grad_clip", float("nan")), ("grad_clip", -1.0),
])
def test_train_config_rejects_non_finite_and_out_of_range_floats(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_train_config_accepts_the_edges_of_each_range():
    tc = TrainConfig(min_lr_ratio=0, weight_decay=0.0, grad_clip=0.0, lr=1e-8)
    assert TrainConfig(min_lr_ratio=1.0).min_lr_ratio == 1.0 and tc.grad_clip == 0.0


@pytest.mark.parametrize("old, name, home", [
    ("linbias.train", "load_run", "linbias.runs"), ("linbias.train", "RunError", "linbias.runs"),
    ("linbias.evaluate", "DEPTHS", "linbias.config"),
])
def test_a_moved_name_still_imports_from_its_old_path_with_a_warning(old, name, home):
    import importlib

    with pytest.warns(DeprecationWarning, match=rf"{old}.{name} moved to {home}.{name}"):
        value = getattr(importlib.import_module(old), name)
    assert value is getattr(importlib.import_module(home), name)
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        getattr(importlib.import_module(old), "nothing")


def test_checks_sit_at_the_bottom_of_the_import_graph():
    import ast
    from pathlib import Path

    import linbias.checks

    tree = ast.parse(Path(linbias.checks.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not any(m.startswith("linbias") for m in imported)


def test_fields_of_the_other_protocol_are_refused_in_the_library_too():
    from linbias.config import EvalConfig
    from linbias.evaluate import eval_config

    with pytest.raises(ValueError, match="depths applies only with a task; drop it or add a task"):
        EvalConfig(lengths=(64,), depths=(50.0,))
    with pytest.raises(ValueError, match="mode, stride, max_tokens apply only without a task"):
        EvalConfig(lengths=(64,), task="passkey", mode="sliding", stride=8, max_tokens=100)
    with pytest.raises(ValueError, match="trials applies only with a task"):
        eval_config(lengths=[64], trials=10)  # the default value, but given: still refused
    perplexity = EvalConfig(lengths=(64,), max_tokens=200)
    task = eval_config(perplexity, task="passkey", trials=2)  # switching protocol: a fresh start
    assert task.max_tokens is None and task.trials == 2
    assert eval_config(task, task=None).trials == EvalConfig(lengths=(1,)).trials
