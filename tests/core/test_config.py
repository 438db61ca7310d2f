"""Config loading: defaults < preset YAML < overrides; a clear ConfigError for every mistake."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

import thrifty
from thrifty.core.config import (
    BaseConfig,
    ConfigError,
    available_presets,
    diff,
    load_config,
    parse_overrides,
    preset_path,
    to_dict,
    to_yaml,
)
from thrifty.methods.glam.config import GlamConfig


@dataclasses.dataclass
class Inner:
    x: int = 10
    y: int = 20
    rate: float = 0.5


@dataclasses.dataclass
class Tiny:
    a: int = 1
    b: int = 2
    c: int = 3
    name: str = "base"
    tags: list[str] = dataclasses.field(default_factory=lambda: ["t0"])
    inner: Inner = dataclasses.field(default_factory=Inner)


@pytest.fixture(autouse=True)
def _no_config_dir_env(monkeypatch):
    monkeypatch.delenv("THRIFTY_CONFIG_DIR", raising=False)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _smoke() -> Path:
    return preset_path("glam", "smoke")


# --------------------------------------------------------------------------- precedence


def test_defaults_only_without_preset_or_overrides():
    cfg = load_config(Tiny)
    assert cfg == Tiny()
    assert isinstance(cfg, Tiny)
    assert isinstance(cfg.inner, Inner)


def test_preset_beats_defaults_and_overrides_beat_preset(tmp_path):
    preset = _write(tmp_path / "p.yaml", "b: 20\nc: 30\ninner: {y: 200}\n")
    cfg = load_config(Tiny, preset, ["c=300", "inner.rate=0.25"])
    assert cfg.a == 1  # default only
    assert cfg.b == 20  # preset over default
    assert cfg.c == 300  # override over preset
    assert cfg.inner.x == 10  # nested default kept when sibling set by preset
    assert cfg.inner.y == 200  # nested preset value
    assert cfg.inner.rate == 0.25  # nested override
    assert cfg.name == "base"
    assert cfg.tags == ["t0"]


def test_resolved_config_is_plain_dataclass_not_omegaconf(tmp_path):
    cfg = load_config(Tiny, None, ["tags=[p,q]"])
    assert type(cfg.tags) is list
    assert cfg.tags == ["p", "q"]
    assert type(cfg.inner) is Inner


def test_glam_smoke_preset_layering():
    cfg = load_config(GlamConfig, _smoke(), ["model.dim=64", "max_steps=7"])
    assert isinstance(cfg, GlamConfig)
    # values from configs/glam/smoke.yaml
    assert cfg.seeds == [0, 1]
    assert cfg.model.num_layers == 2
    assert cfg.model.num_heads == 2
    assert cfg.model.ffn_dim == 64
    assert cfg.model.seq_len == 32
    assert cfg.moe.num_experts == 4
    assert cfg.moe.group_size == 256
    assert cfg.data.eval_windows == 8
    assert cfg.batch_size == 8
    assert cfg.optim.warmup_steps == 4
    assert cfg.checkpoint_every == 10
    # overrides over the preset
    assert cfg.model.dim == 64
    assert cfg.max_steps == 7
    # dataclass defaults the preset does not mention
    assert cfg.moe.capacity_factor == 2.0
    assert cfg.moe.mode == "capacity"
    assert cfg.optim.beta2 == 0.95
    assert cfg.optim.name == "adamw"
    assert cfg.model.init_std == 0.02
    assert cfg.loss.aux_weight == 0.01
    assert cfg.arms == ["moe", "dense-active", "dense-params"]
    assert cfg.preset == "custom"  # core loader does not set it; the registry does


def test_glam_quick_preset_loads_and_matches_defaults_where_it_repeats_them():
    cfg = load_config(GlamConfig, preset_path("glam", "quick"))
    # the method card's quick miniature: L4 (2 MoE) d128 4 heads ff512 E8 top-2 cf2, seq 128, BPE 4096, 3 seeds
    m = cfg.model
    assert (m.num_layers, m.dim, m.num_heads, m.ffn_dim, m.seq_len, m.vocab_size) == (4, 128, 4, 512, 128, 4096)
    assert (cfg.moe.num_experts, cfg.moe.capacity_factor, cfg.moe.mode) == (8, 2.0, "capacity")
    assert (cfg.loss.aux_weight, cfg.loss.z_weight) == (0.01, 1e-4)
    assert cfg.seeds == [0, 1, 2]


REPO_GLAM_PRESETS = Path(thrifty.__file__).resolve().parents[2] / "configs" / "glam"


def _shipped_glam_presets() -> list[str]:
    return sorted(p.stem for p in REPO_GLAM_PRESETS.glob("*.yaml"))


@pytest.mark.parametrize("preset", _shipped_glam_presets())
def test_every_shipped_glam_preset_loads_and_validates(preset):
    path = preset_path("glam", preset)
    cfg = load_config(GlamConfig, path)
    data = yaml.safe_load(path.read_text())
    # every top-level scalar/list the file sets is what the config holds
    for key, value in data.items():
        if not isinstance(value, dict):
            assert getattr(cfg, key) == value, key
        else:
            for sub, subvalue in value.items():
                assert getattr(getattr(cfg, key), sub) == subvalue, f"{key}.{sub}"


def test_list_and_bool_overrides():
    cfg = load_config(GlamConfig, _smoke(), ["arms=[moe,dense-active]", "progress=false", "seeds=[3,4,5]"])
    assert cfg.arms == ["moe", "dense-active"]
    assert cfg.progress is False
    assert cfg.seeds == [3, 4, 5]


def test_empty_preset_file_keeps_defaults(tmp_path):
    cfg = load_config(Tiny, _write(tmp_path / "empty.yaml", ""))
    assert cfg == Tiny()


# --------------------------------------------------------------------------- unknown keys


def test_unknown_top_level_override_names_key_and_suggests():
    with pytest.raises(ConfigError) as ei:
        load_config(GlamConfig, _smoke(), ["max_step=3"])
    msg = str(ei.value)
    assert "'max_step'" in msg
    assert "did you mean max_steps" in msg
    assert "command-line" in msg


def test_unknown_nested_override_names_full_key_and_suggests_nested():
    with pytest.raises(ConfigError) as ei:
        load_config(GlamConfig, _smoke(), ["moe.num_expert=4"])
    msg = str(ei.value)
    assert "'moe.num_expert'" in msg
    assert "moe.num_experts" in msg
    # the valid-key listing is of the nested section, not the top level
    assert "moe.capacity_factor" in msg


def test_unknown_key_in_preset_names_file_and_key(tmp_path):
    preset = _write(tmp_path / "bad.yaml", "moe: {num_expert: 3}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(GlamConfig, preset)
    msg = str(ei.value)
    assert "'moe.num_expert'" in msg
    assert "moe.num_experts" in msg
    assert str(preset) in msg


def test_unknown_section_suggests_close_section():
    with pytest.raises(ConfigError) as ei:
        load_config(GlamConfig, None, ["modle.dim=3"])
    msg = str(ei.value)
    assert "modle" in msg
    assert "model" in msg.split("did you mean", 1)[1]


# --------------------------------------------------------------------------- wrong types


def test_wrong_type_int_names_key_and_expected_type():
    with pytest.raises(ConfigError) as ei:
        load_config(GlamConfig, _smoke(), ["max_steps=abc"])
    msg = str(ei.value)
    assert "'max_steps'" in msg
    assert "expected int" in msg
    assert "abc" in msg


def test_wrong_type_list_for_float_names_nested_key_and_float():
    with pytest.raises(ConfigError) as ei:
        load_config(GlamConfig, _smoke(), ["optim.lr=[1]"])
    msg = str(ei.value)
    assert "'optim.lr'" in msg
    assert "expected float" in msg


def test_wrong_type_scalar_for_list():
    with pytest.raises(ConfigError) as ei:
        load_config(GlamConfig, None, ["seeds=5"])
    msg = str(ei.value)
    assert "'seeds'" in msg
    assert "list[int]" in msg


def test_wrong_type_in_preset_file(tmp_path):
    preset = _write(tmp_path / "p.yaml", "max_steps: lots\n")
    with pytest.raises(ConfigError) as ei:
        load_config(GlamConfig, preset)
    msg = str(ei.value)
    assert "'max_steps'" in msg
    assert "expected int" in msg
    assert str(preset) in msg


def test_bad_bool_names_key():
    with pytest.raises(ConfigError) as ei:
        load_config(GlamConfig, None, ["resume=maybe"])
    assert "'resume'" in str(ei.value)
    assert "bool" in str(ei.value)


@pytest.mark.parametrize("override", ["optim=3", "model=[1,2]"])
def test_scalar_or_list_for_a_section_is_a_config_error(override):
    # A whole section replaced by a scalar/list must be rejected like any other wrong type.
    with pytest.raises(ConfigError) as ei:
        load_config(GlamConfig, None, [override])
    assert override.split("=")[0] in str(ei.value)


def test_section_given_as_scalar_in_preset_is_a_config_error(tmp_path):
    preset = _write(tmp_path / "p.yaml", "optim: 3\n")
    with pytest.raises(ConfigError) as ei:
        load_config(GlamConfig, preset)
    assert "optim" in str(ei.value)


def test_mapping_for_a_list_is_a_config_error():
    with pytest.raises(ConfigError) as ei:
        load_config(GlamConfig, None, ["arms={a:1}"])
    assert "arms" in str(ei.value)


# --------------------------------------------------------------------------- malformed overrides


@pytest.mark.parametrize("item", ["max_steps", "=3"])
def test_malformed_override_is_clear(item):
    with pytest.raises(ConfigError) as ei:
        load_config(GlamConfig, None, [item])
    msg = str(ei.value)
    assert repr(item) in msg
    assert "key=value" in msg


def test_parse_overrides_rejects_malformed_and_parses_lists():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["a=1", "oops"])
    parsed = parse_overrides(["a.b=1", "arms=[moe,dense]"])
    assert parsed.a.b == 1
    assert list(parsed.arms) == ["moe", "dense"]


def test_unparseable_override_value_is_config_error():
    with pytest.raises(ConfigError, match="max_steps"):
        load_config(GlamConfig, None, ["max_steps=[1"])


# --------------------------------------------------------------------------- presets


def test_available_presets_for_glam():
    found = available_presets("glam")
    assert {"quick", "smoke"} <= set(found)
    assert found == _shipped_glam_presets()
    assert available_presets("no_such_recipe") == []


def test_available_presets_sorted_yaml_stems_only(tmp_path, monkeypatch):
    (tmp_path / "r").mkdir()
    for name in ("b.yaml", "a.yaml", "notes.txt", "c.yml"):
        (tmp_path / "r" / name).write_text("{}\n")
    monkeypatch.setenv("THRIFTY_CONFIG_DIR", str(tmp_path))
    assert available_presets("r") == ["a", "b"]


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError) as ei:
        preset_path("glam", "huge")
    msg = str(ei.value)
    assert "'huge'" in msg
    assert "quick" in msg
    assert "smoke" in msg


def test_unknown_recipe_preset_says_none():
    with pytest.raises(ConfigError, match="available presets: none"):
        preset_path("no_such_recipe", "smoke")


def test_config_dir_env_var_takes_precedence(tmp_path, monkeypatch):
    (tmp_path / "glam").mkdir()
    _write(tmp_path / "glam" / "mine.yaml", "max_steps: 3\n")
    monkeypatch.setenv("THRIFTY_CONFIG_DIR", str(tmp_path))
    assert available_presets("glam") == ["mine"]
    assert preset_path("glam", "mine") == tmp_path / "glam" / "mine.yaml"
    # presets missing from the env dir are still found in the repository's configs/
    assert preset_path("glam", "smoke").name == "smoke.yaml"
    assert load_config(GlamConfig, preset_path("glam", "mine")).max_steps == 3


@pytest.mark.parametrize("text,kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_preset_that_is_not_a_mapping_errors(tmp_path, text, kind):
    preset = _write(tmp_path / "p.yaml", text)
    with pytest.raises(ConfigError) as ei:
        load_config(GlamConfig, preset)
    msg = str(ei.value)
    assert "mapping" in msg
    assert kind in msg
    assert str(preset) in msg


def test_unreadable_preset_yaml_errors(tmp_path):
    preset = _write(tmp_path / "p.yaml", "max_steps: [\n")
    with pytest.raises(ConfigError, match="cannot read preset"):
        load_config(GlamConfig, preset)


def test_missing_preset_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read preset"):
        load_config(GlamConfig, tmp_path / "nope.yaml")


# --------------------------------------------------------------------------- validate()


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["arms=[bogus]"], "arms"),
        (["arms=[]"], "arms"),
        (["seeds=[1,1]"], "seeds"),
        (["seeds=[]"], "seeds"),
        (["model.num_layers=3"], "model.num_layers"),
        (["checkpoint_every=7"], "checkpoint_every"),
        (["model.dim=33"], "model.dim"),
        (["ablations=[nope]"], "ablations"),
        (["ablation_seeds=3"], "ablation_seeds"),
        (["max_steps=0"], "max_steps"),
        (["num_threads=-1"], "num_threads"),
        (["moe.mode=weird"], "moe.mode"),
        (["optim.name=sgd"], "optim.name"),
        (["data.weights=[1.0]"], "data.weights"),
    ],
)
def test_validate_failures_surface_as_config_error(overrides, key):
    # smoke: seeds [0, 1], log_every 5, model.num_heads 2
    with pytest.raises(ConfigError) as ei:
        load_config(GlamConfig, _smoke(), overrides)
    assert key in str(ei.value)


def test_validate_runs_on_base_config():
    with pytest.raises(ConfigError, match="duplicates"):
        load_config(BaseConfig, None, ["seeds=[2,2]"])
    assert load_config(BaseConfig, None, ["seeds=[2,3]"]).seeds == [2, 3]


def test_valid_edge_values_pass():
    # checkpoint_every a multiple of log_every, ablation_seeds == len(seeds), even layers
    cfg = load_config(
        GlamConfig,
        _smoke(),
        ["checkpoint_every=15", "ablation_seeds=2", "model.num_layers=4", "ablations=[cf1]"],
    )
    assert cfg.checkpoint_every == 15
    assert cfg.ablation_seeds == 2


# --------------------------------------------------------------------------- serialisation


def test_to_dict_is_plain_nested_dict():
    cfg = load_config(GlamConfig, _smoke())
    d = to_dict(cfg)
    assert type(d) is dict
    assert type(d["model"]) is dict
    assert type(d["seeds"]) is list
    assert d["model"]["dim"] == 32
    assert d["seeds"] == [0, 1]
    assert list(d) == [f.name for f in dataclasses.fields(GlamConfig)]


def test_to_yaml_round_trips_through_load_config(tmp_path):
    cfg = load_config(GlamConfig, _smoke(), ["model.dim=64", "arms=[moe]", "optim.lr=0.00025", "preset=smoke"])
    text = to_yaml(cfg)
    assert yaml.safe_load(text) == to_dict(cfg)
    assert list(yaml.safe_load(text)) == [f.name for f in dataclasses.fields(GlamConfig)]
    again = load_config(GlamConfig, _write(tmp_path / "round.yaml", text))
    assert again == cfg
    assert diff(to_dict(again), to_dict(cfg)) == []


def test_to_yaml_round_trip_small_floats(tmp_path):
    cfg = load_config(GlamConfig, None, ["loss.z_weight=1e-10", "optim.weight_decay=0.1"])
    again = load_config(GlamConfig, _write(tmp_path / "r.yaml", to_yaml(cfg)))
    assert again.loss.z_weight == 1e-10
    assert again == cfg


# --------------------------------------------------------------------------- diff


def test_diff_reports_nested_and_added_keys():
    a = {"a": 1, "m": {"x": 1, "y": 2, "deep": {"z": 0}}, "l": [1, 2]}
    b = {"a": 1, "m": {"x": 1, "y": 3, "deep": {"z": 1}}, "l": [1, 2], "n": 5}
    assert diff(a, b) == ["m.deep.z", "m.y", "n"]


def test_diff_lists_and_identity():
    assert diff({"l": [1, 2]}, {"l": [2, 1]}) == ["l"]
    assert diff({"l": [1, 2]}, {"l": [1, 2]}) == []
    assert diff({}, {}) == []
    a = {"k": {"v": 1}}
    assert diff(a, a) == []


def test_diff_between_real_configs():
    a = to_dict(load_config(GlamConfig, _smoke()))
    b = to_dict(load_config(GlamConfig, _smoke(), ["moe.num_experts=8", "max_steps=21", "progress=false"]))
    assert diff(a, b) == ["max_steps", "moe.num_experts", "progress"]


def test_check_choices_names_the_key_and_the_unknown_values():
    from thrifty.core.config import check_choices

    check_choices(("arms", ("a", "b"), ["a"]), ("stages", ("x",), []))  # all fine: no error
    with pytest.raises(ValueError, match=r"config key 'sweep\.arms': unknown \['c'\]; choose from \['a', 'b'\]"):
        check_choices(("arms", ("a", "b"), ["b"]), ("sweep.arms", ("a", "b"), ["a", "c"]))
