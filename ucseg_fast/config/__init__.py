"""Configuration: frozen dataclasses (`schema`), strict TOML presets and dotted CLI overrides,
validated as a whole (`rules`) before anything is built.

A preset states only what differs from the defaults; the defaults are the reference ACDC
recipe (docs/method.md §3). Presets ship with the package (`ucseg_fast/presets/*.toml`) and are
named by their stem (`--config acdc_2d`); any other TOML file is named by its path. Unknown keys,
wrong types and bad values are errors that name the file and the key, so a typo never silently
trains the wrong thing; a key that moved says where it went.
"""
from __future__ import annotations

import tomllib
import typing
from importlib import resources
from pathlib import Path
from typing import Any

from .rules import ConfigError, validate
from .schema import (ALLOWED_LABELED, CHOICES, RECIPES, Config, DataConfig, LossConfig,
                     ModelConfig, RecipeSpec, ReferenceConfig, TrainConfig, phase2_start_at,
                     scaled_iteration)

__all__ = ["ALLOWED_LABELED", "CHOICES", "RECIPES", "Config", "ConfigError", "DataConfig",
           "LossConfig", "ModelConfig", "RecipeSpec", "ReferenceConfig", "TrainConfig",
           "apply_overrides", "config_from_dict", "diff_configs", "load_config",
           "parse_override", "phase2_start_at", "preset_names", "preset_path",
           "scaled_iteration"]

#: keys that moved, and where to (a preset or override naming the old key is told)
MOVED = {
    "loss.supervision": "recipe (the recipe fixes the supervision: recipe = \"binary_2d\" or "
                        "\"binary_3d\" for sigmoid, \"multiclass_2d\" for softmax)",
    "loss.queue_pointer": "reference.queue_pointer",
    "loss.queue_init": "reference.queue_init",
    "loss.queue_gate": "reference.queue_gate",
    "train.compile_backend": "nothing (torch.compile uses Inductor)",
}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        elem = args[0]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if set(typing.get_args(tp)) == {bool, str}:  # a switch: true / false / "auto"
        if not isinstance(value, (bool, str)):
            raise ConfigError(f"{where}: expected true, false or \"auto\", got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover


def _build(data: dict[str, Any], source: str) -> Config:
    top = typing.get_type_hints(Config)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in top:
            raise ConfigError(f"{source}: unknown key '{key}' (known: {', '.join(top)})")
        tp = top[key]
        if tp is str:
            kwargs[key] = _coerce(value, str, f"{source}: {key}")
            choices = CHOICES.get((key,))
            if choices and kwargs[key] not in choices:
                raise ConfigError(f"{source}: {key} = {kwargs[key]!r}; choose one of {choices}")
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{key}] must be a table")
        hints = typing.get_type_hints(tp)
        sec: dict[str, Any] = {}
        for k, v in value.items():
            if k not in hints:
                moved = MOVED.get(f"{key}.{k}")
                if moved:
                    raise ConfigError(f"{source}: '{key}.{k}' is no longer a key: it moved to "
                                      f"{moved}")
                raise ConfigError(
                    f"{source}: unknown key '{key}.{k}' (known: {', '.join(hints)})")
            sec[k] = _coerce(v, hints[k], f"{source}: {key}.{k}")
            choices = CHOICES.get((key, k))
            if choices and sec[k] not in choices:
                raise ConfigError(f"{source}: {key}.{k} = {sec[k]!r}; choose one of {choices}")
        kwargs[key] = tp(**sec)
    cfg = Config(**kwargs)
    validate(cfg, source)
    return cfg


def preset_names() -> list[str]:
    """The presets that ship with the package (`--config <name>`)."""
    root = resources.files("ucseg_fast") / "presets"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def preset_path(name_or_path: str | Path) -> Path:
    """A TOML file: an existing path as given, else the packaged preset of that name
    (`acdc_2d` or `acdc_2d.toml`). ConfigError naming the known presets otherwise."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    stem = p.name[:-5] if p.name.endswith(".toml") else p.name
    if p.parent == Path(".") and stem in preset_names():
        return Path(str(resources.files("ucseg_fast") / "presets" / f"{stem}.toml"))
    raise ConfigError(f"config file not found: {p} (a path to a TOML file, or a preset name: "
                      f"{', '.join(preset_names())})")


def _merge(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in upd.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'--train.max_iterations=300' or 'train.max_iterations=300' -> (['train', 'max_iterations'], 300).

    Values are parsed as TOML literals (numbers, booleans, lists, quoted strings); anything
    that is not a TOML literal is taken as a bare string."""
    s = text[2:] if text.startswith("--") else text
    if "=" not in s:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = s.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 and parts not in (["name"], ["recipe"]):
        raise ConfigError(f"override {text!r}: expected section.key=value (e.g. train.max_iterations=300)")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return parts, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the TOML preset at `path` (if any), then dotted overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = preset_path(path)
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from e
        source = str(p)
        _build(data, source)  # report preset errors against the file, before overrides
    data = _apply(data, overrides)
    return _build(data, f"{source} + overrides" if overrides else source)


def _apply(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    for ov in overrides:
        parts, value = parse_override(ov)
        upd: dict[str, Any] = {parts[0]: value} if len(parts) == 1 else {parts[0]: {parts[1]: value}}
        data = _merge(data, upd)
    return data


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """`cfg` with dotted overrides (as `load_config` takes them) applied and validated."""
    if not overrides:
        return cfg
    return _build(_apply(cfg.to_dict(), overrides), "config + overrides")


def config_from_dict(data: dict[str, Any], source: str = "checkpoint") -> Config:
    """Rebuild a Config from `Config.to_dict()` output (lists for tuples). A dictionary saved
    before the recipe key existed (no "recipe") is read with its keys moved: the recipe from
    the image dimensions and `loss.supervision`, the reference switches to [reference]."""
    return _build(_upgrade(data) if "recipe" not in data else data, source)


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    loss, train = data.setdefault("loss", {}), data.setdefault("train", {})
    sigmoid = loss.pop("supervision", "softmax") == "sigmoid"
    dims = len(data.get("data", {}).get("img_size", DataConfig.img_size))
    data["recipe"] = "binary_3d" if dims == 3 else ("binary_2d" if sigmoid else "multiclass_2d")
    ref = {k: loss.pop(k) for k in ("queue_pointer", "queue_init", "queue_gate") if k in loss}
    if ref:
        data["reference"] = {**data.get("reference", {}), **ref}
    train.pop("compile_backend", None)
    if train.get("amp") == "fp16":
        train["amp"] = "none"
    return data


def diff_configs(a: Config, b: Config, sections=("data", "model", "loss", "reference"),
                 keys: tuple[str, ...] | None = None) -> list[str]:
    """Keys (section.key) whose values differ between a and b in the given sections
    (only `keys` of them when given)."""
    out = [] if a.recipe == b.recipe else [f"recipe: {a.recipe!r} != {b.recipe!r}"]
    da, db = a.to_dict(), b.to_dict()
    for s in sections:
        for k in da[s]:
            if keys is not None and k not in keys:
                continue
            if da[s][k] != db[s][k]:
                out.append(f"{s}.{k}: {da[s][k]!r} != {db[s][k]!r}")
    return out
