"""Configs: dataclass defaults, then a YAML preset, then dotted ``key=value`` overrides.

Every recipe describes its settings as (nested) dataclasses. A preset in
``configs/<recipe>/<preset>.yaml`` and command-line overrides are merged on top through OmegaConf's
structured configs, so an unknown key or a value of the wrong type is rejected with one clear
:class:`ConfigError` that names the key and, for unknown keys, the closest valid ones.
The resolved config is a plain dataclass instance again (``OmegaConf.to_object``), so recipe code
gets attribute access, type hints and no OmegaConf objects.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

T = TypeVar("T")

PRESETS = ("smoke", "quick", "cpu", "full")


class ConfigError(ValueError):
    """A config key, value or preset is invalid; the message says which and what is expected."""


def config_dirs() -> list[Path]:
    """Directories searched for ``<recipe>/<preset>.yaml``, most specific first.

    ``$THRIFTY_CONFIG_DIR`` wins; then the repository's ``configs/`` (editable installs); then the copy
    installed with the package under ``<prefix>/share/thrifty/configs``.
    """
    dirs = []
    if env := os.environ.get("THRIFTY_CONFIG_DIR"):
        dirs.append(Path(env))
    dirs.append(Path(__file__).resolve().parents[3] / "configs")
    dirs.append(Path(sys.prefix) / "share" / "thrifty" / "configs")
    return dirs


def available_presets(recipe: str) -> list[str]:
    """Preset names that exist for ``recipe`` in the first config directory that has it."""
    for d in config_dirs():
        if (d / recipe).is_dir():
            return sorted(p.stem for p in (d / recipe).glob("*.yaml"))
    return []


def preset_path(recipe: str, preset: str) -> Path:
    """Path of a preset file; :class:`ConfigError` lists the presets that exist when it is missing."""
    for d in config_dirs():
        path = d / recipe / f"{preset}.yaml"
        if path.is_file():
            return path
    known = available_presets(recipe)
    raise ConfigError(
        f"unknown preset {preset!r} for recipe {recipe!r}; available presets: {', '.join(known) or 'none'}"
    )


def _field_names(schema: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else []


def _nested_schema(schema: Any, dotted: str) -> Any:
    """The dataclass type that owns the last component of ``dotted`` (for suggestions)."""
    node = schema
    for part in dotted.split(".")[:-1]:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return node
        default = fields[part].default_factory  # type: ignore[misc]
        node = default() if callable(default) else fields[part].type
        node = type(node) if dataclasses.is_dataclass(node) and not isinstance(node, type) else node
    return node


def _field_type(schema: Any, dotted: str) -> str | None:
    owner = _nested_schema(schema, dotted)
    if not dataclasses.is_dataclass(owner):
        return None
    for f in dataclasses.fields(owner):
        if f.name == dotted.split(".")[-1]:
            return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return None


def _unknown_key_message(schema: Any, key: str, source: str) -> str:
    owner = _nested_schema(schema, key)
    leaf = key.split(".")[-1]
    names = _field_names(owner)
    close = difflib.get_close_matches(leaf, names, n=3)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
    return f"unknown config key {key!r} in {source}{hint} Valid keys here: {', '.join(prefix + n for n in names)}"


def _check_shapes(base: Any, other: Any, source: str, prefix: str = "") -> None:
    """Reject a section given as a scalar/list, or a list given as a mapping, naming the key."""
    if not isinstance(other, (dict, DictConfig)) or not isinstance(base, DictConfig):
        return
    for k, v in other.items():
        if k not in base:
            continue
        b = base._get_node(k)  # the node, so a missing value is not an error here
        key = f"{prefix}{k}"
        if isinstance(b, DictConfig) and not isinstance(v, (dict, DictConfig)):
            raise ConfigError(f"bad value for config key {key!r} in {source}: expected a section of keys, got {v!r}")
        if isinstance(b, ListConfig) and isinstance(v, (dict, DictConfig)):
            raise ConfigError(f"bad value for config key {key!r} in {source}: expected a list, got a mapping")
        if isinstance(b, DictConfig):
            _check_shapes(b, v, source, prefix=f"{key}.")


def _merge(base: DictConfig, other: Any, schema: Any, source: str) -> DictConfig:
    _check_shapes(base, other, source)
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except ConfigKeyError as err:
        key = err.full_key or str(err.key)
        raise ConfigError(_unknown_key_message(schema, key, source)) from None
    except ValidationError as err:
        key = err.full_key or (str(err.key) if err.key is not None else _first_key(other))
        expected = _field_type(schema, key) or "a section of keys" if key else "its declared type"
        detail = (err.msg or str(err) or "wrong type").splitlines()[0]
        raise ConfigError(f"bad value for config key {key!r} in {source}: {detail} (expected {expected})") from None
    except (OmegaConfBaseException, TypeError) as err:
        raise ConfigError(f"invalid config from {source}: {str(err).splitlines()[0]}") from None


def _first_key(other: Any) -> str:
    """Best guess of the offending key when OmegaConf does not name it (a section given a scalar)."""
    try:
        keys = list(other.keys())
    except AttributeError:
        return ""
    return str(keys[0]) if len(keys) == 1 else ", ".join(map(str, keys))


def parse_overrides(overrides: list[str]) -> DictConfig:
    """Turn ``["a.b=1", "arms=[moe,dense]"]`` into a config; malformed items raise :class:`ConfigError`."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. max_steps=100)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as err:  # OmegaConf raises a variety of grammar errors
        raise ConfigError(f"could not parse overrides {overrides}: {err}") from None


def load_config(schema: type[T], preset_file: Path | None = None, overrides: list[str] | None = None) -> T:
    """Build a config: dataclass defaults < YAML preset < ``key=value`` overrides.

    Args:
        schema: the recipe's top-level config dataclass.
        preset_file: YAML file with a subset of the keys (``None`` keeps the defaults).
        overrides: dotted ``key=value`` strings; lists use ``[a,b]``.

    Returns:
        A validated instance of ``schema``.

    Raises:
        ConfigError: unknown key, wrong type, unreadable YAML or a failed ``validate()``.
    """
    cfg = OmegaConf.structured(schema)
    if preset_file is not None:
        try:
            data = yaml.safe_load(Path(preset_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read preset {preset_file}: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"preset {preset_file} must hold a mapping of keys, not {type(data).__name__}")
        cfg = _merge(cfg, data, schema, f"preset {preset_file}")
    if overrides:
        cfg = _merge(cfg, parse_overrides(overrides), schema, "command-line overrides")
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config: {err}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except (ValueError, TypeError) as err:
            raise ConfigError(str(err)) from None
    return obj  # type: ignore[return-value]


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (lists and scalars only)."""
    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    """YAML text of a resolved config, keys in declaration order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    keys = sorted(set(a) | set(b))
    out: list[str] = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff(va, vb, f"{prefix}{k}.")
        elif isinstance(va, (list, ListConfig)) or isinstance(vb, (list, ListConfig)):
            if list(va or []) != list(vb or []):
                out.append(prefix + k)
        elif va != vb:
            out.append(prefix + k)
    return out


PRECISIONS = ("fp32", "bf16")  # training precisions a ``precision`` key accepts (see ``core.run.autocast``)


def check_choices(*checks: tuple[str, Sequence[str], Sequence[str]]) -> None:
    """``ValueError`` naming the config key when a list setting holds a value outside its choices.

    Each check is ``(key, allowed, values)``, e.g. ``("arms", ARMS, cfg.arms)``."""
    for key, allowed, values in checks:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"config key {key!r}: unknown {bad}; choose from {list(allowed)}")


@dataclasses.dataclass
class BaseConfig:
    """Settings every recipe shares; a recipe's config dataclass extends this one.

    Attributes:
        preset: name of the preset the config came from (set by the CLI; recorded in results).
        seeds: training seeds; claims are measured over all of them.
        out_dir: root of run directories (``<out_dir>/<recipe>/<run_name>/``).
        run_name: run directory name; empty means the preset name.
        resume: continue finished/partial work found in the run directory (same config required).
        device: ``auto`` (CUDA if available, else CPU), ``cpu`` or ``cuda[:i]``.
        num_threads: intra-op CPU threads; 0 leaves torch's default.
        deterministic: ask torch for deterministic kernels (same seed, same numbers on CPU).
        data_dir: cache for generated data and tokenizers; empty means ``$THRIFTY_DATA`` or
            ``~/.cache/thrifty``.
        progress: show progress bars (they fall back to log lines when stderr is not a terminal).
    """

    preset: str = "custom"
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    out_dir: str = "runs"
    run_name: str = ""
    resume: bool = True
    device: str = "auto"
    num_threads: int = 0
    deterministic: bool = True
    data_dir: str = ""
    progress: bool = True

    def validate(self) -> None:
        if not self.seeds:
            raise ValueError("config key 'seeds' must list at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"config key 'seeds' has duplicates: {self.seeds}")
        if self.num_threads < 0:
            raise ValueError("config key 'num_threads' must be >= 0")


@dataclasses.dataclass
class UnitsConfig(BaseConfig):
    """:class:`BaseConfig` for recipes whose training units (arm x seed, sweep points) are independent.

    Attributes:
        workers: train this many units at once in separate processes (:func:`thrifty.core.parallel.train_units`),
            each with ``num_threads / workers`` threads (at least 1); 1 trains them one after another in this
            process. Ignored under torchrun (DDP already splits every step). A unit's numbers do not depend on the
            units beside it; like any change of thread count they may differ from a 1-worker run in the last bits.
    """

    workers: int = 1

    def validate(self) -> None:
        super().validate()
        if self.workers < 1:
            raise ValueError(f"config key 'workers' must be >= 1, got {self.workers}")
