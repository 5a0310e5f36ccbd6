"""gnlm.config, the typed loader every component's options go through: each kind of annotation accepts what it
should (and converts only where harmless), refuses the rest in one line naming the key, and dotted overrides
nest as written."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest

from gnlm.config import ConfigError, dumps_json, from_dict, merge, parse_overrides, to_dict


@dataclass
class Inner:
    size: int = 1
    name: str = "a"

    def validate(self) -> None:
        if self.size < 1:
            raise ConfigError(f"inner.size must be >= 1, got {self.size}")


@dataclass
class Outer:
    RENAMED: ClassVar[dict[str, str]] = {"lr_max": "lr"}

    lr: float = 1e-3
    steps: int = 10
    flag: bool = False
    mode: Literal["fast", "slow"] = "fast"
    path: Path = Path(".")
    pair: tuple[float, float] = (0.9, 0.95)
    names: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)
    size: int | str = 4
    limit: float | None = None


def test_each_annotation_accepts_and_converts_only_where_harmless():
    cfg = from_dict(Outer, {"lr": "1e-3", "steps": 3.0, "flag": True, "mode": "slow", "path": "runs/x",
                            "pair": [0.8, 1], "names": ["wte"], "extra": {"k": 1}, "inner": {"size": 2},
                            "size": "auto", "limit": None})
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)  # YAML 1.1 reads 1e-3 (no dot) as a string
    assert cfg.steps == 3 and isinstance(cfg.steps, int)  # a whole float is an integer
    assert cfg.path == Path("runs/x") and cfg.pair == (0.8, 1.0) and isinstance(cfg.pair[1], float)
    assert cfg.inner == Inner(size=2, name="a")  # a partial mapping refines the field's default
    assert cfg.size == "auto" and cfg.limit is None
    assert from_dict(Outer, to_dict(cfg)) == cfg  # to_dict round-trips (Path as str, tuple as list)


@pytest.mark.parametrize("data,message", [
    ({"lr": "fast"}, "lr: expected a number, got 'fast'"),
    ({"lr": True}, "lr: expected a number, got True"),
    ({"steps": 2.5}, "steps: expected an integer, got 2.5"),
    ({"steps": False}, "steps: expected an integer, got False"),
    ({"flag": "yes"}, "flag: expected true or false, got 'yes'"),
    ({"mode": "fastt"}, "mode: 'fastt' is not one of ['fast', 'slow'] (did you mean 'fast'?)"),
    ({"path": 3}, "path: expected a path, got 3"),
    ({"pair": 0.9}, "pair: expected a list, got 0.9"),
    ({"pair": [0.9]}, "pair: expected a list of 2 values, got [0.9]"),
    ({"pair": [0.9, "x"]}, "pair[1]: expected a number, got 'x'"),
    ({"names": ["a", 3]}, "names[1]: expected a string, got 3"),
    ({"extra": [1]}, "extra: expected a mapping, got [1]"),
    ({"inner": 5}, "inner: expected a mapping of Inner options, got 5"),
    ({"inner": {"size": 0}}, "inner.size must be >= 1, got 0"),
    ({"inner": {"sise": 2}}, "unknown config key 'inner.sise': did you mean 'inner.size'?"),
    ({"size": 2.5}, "size: expected int or str, got 2.5"),
    ({"limit": "none"}, "limit: expected a number, got 'none'"),
    ({"lr_max": 0.1}, "config key 'lr_max' was renamed: write 'lr' instead"),
    ({"zzz": 1}, "unknown config key 'zzz': valid keys: lr, steps, flag"),
])
def test_a_wrong_value_is_one_line_naming_its_key(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, data)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_missing_required_field_and_a_non_mapping_are_one_line():
    @dataclass
    class Needs:
        name: str

    with pytest.raises(ConfigError, match="^needs: .*missing 1 required positional argument: 'name'$"):
        from_dict(Needs, {}, prefix="needs")
    with pytest.raises(ConfigError, match=r"^config: expected a mapping, got \[1, 2\]$"):
        from_dict(Outer, [1, 2])


def test_overrides_nest_parse_yaml_scalars_and_refuse_conflicts():
    assert parse_overrides(["optim.lr=3e-4", "--train.steps=10", "data.paths=[a, b]", "model.name=", "x.y=[unclosed"]) \
        == {"optim": {"lr": "3e-4"}, "train": {"steps": 10}, "data": {"paths": ["a", "b"]}, "model": {"name": ""},
            "x": {"y": "[unclosed"}}  # YAML 1.1 reads 3e-4 as text (the float field converts it); a value YAML
    # cannot read stays the text written
    for bad, message in [("optim.lr", "is not of the form key.sub=value"), ("=3", "has an empty key"),
                         ("--=3", "has an empty key")]:
        with pytest.raises(ConfigError, match=message):
            parse_overrides([bad])
    with pytest.raises(ConfigError, match="override 'model.preset.x=1' conflicts with an earlier override of 'preset'"):
        parse_overrides(["model.preset=nano", "model.preset.x=1"])
    assert merge({"a": {"b": 1, "c": 2}}, parse_overrides(["a.b=3"])) == {"a": {"b": 3, "c": 2}}


def test_json_files_never_hold_bare_nan_or_infinity():
    text = dumps_json({"a": math.nan, "b": [math.inf, 1.5], "c": (-math.inf,)})
    assert text == '{"a": null, "b": [null, 1.5], "c": [null]}'
