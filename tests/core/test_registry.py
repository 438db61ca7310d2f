"""Recipe registry: explicit list, helpful unknown-name errors, planned recipes, config loading."""

from __future__ import annotations

import re

import pytest

from thrifty.core import registry
from thrifty.core.config import ConfigError, available_presets
from thrifty.core.registry import RecipeNotReady, UnknownRecipe, get, load_config, names
from thrifty.methods.glam.config import GlamConfig

ALL = [
    "glam",
    "autodistill",
    "bigssl",
    "genesis",
    "squid",
    "mt_transunet",
    "data_assemble",
    "pe_cad",
    "temporal_gradient",
]


@pytest.fixture(autouse=True)
def _no_config_dir_env(monkeypatch):
    monkeypatch.delenv("THRIFTY_CONFIG_DIR", raising=False)


def test_names_lists_every_recipe_and_which_are_ready():
    assert names() == ALL
    assert names(ready_only=True) == ALL  # every recipe is implemented


@pytest.fixture
def planned(monkeypatch):
    """A registry with one more recipe that is planned but not implemented yet."""
    recipe = registry.Recipe("planned_demo", "A planned recipe", "0000.00000", "none", None)
    monkeypatch.setattr(registry, "RECIPES", (*registry.RECIPES, recipe))
    return recipe


def test_a_planned_recipe_is_listed_but_not_ready(planned):
    assert names() == [*ALL, "planned_demo"]
    assert names(ready_only=True) == ALL


def test_get_glam():
    r = get("glam")
    assert r.name == "glam"
    assert r.ready is True
    assert r.arxiv == "2112.06905"
    module = r.load()
    assert module.Config is GlamConfig
    assert callable(module.train)


def test_unknown_recipe_lists_known_and_suggests_close_match():
    with pytest.raises(UnknownRecipe) as ei:
        get("glm")
    msg = str(ei.value)
    assert "'glm'" in msg
    assert "Did you mean glam" in msg
    for name in ALL:
        assert name in msg
    assert not msg.startswith('"')  # readable, not KeyError's quoted repr
    assert isinstance(ei.value, KeyError)


def test_unknown_recipe_without_close_match_has_no_hint():
    with pytest.raises(UnknownRecipe) as ei:
        get("zzzzzz")
    assert "Did you mean" not in str(ei.value)
    assert "glam" in str(ei.value)


def test_planned_recipe_raises_not_ready_on_load(planned):
    r = get("planned_demo")
    assert r.ready is False
    with pytest.raises(RecipeNotReady) as ei:
        r.load()
    msg = str(ei.value)
    assert "planned_demo" in msg
    assert "glam" in msg and "pe_cad" in msg  # points at what is ready
    assert "planned_demo" not in msg.split("ready recipes:")[1]


def test_pe_cad_is_ready_with_its_cpu_claim_preset():
    r = get("pe_cad")
    assert r.ready and r.claim_preset == "cpu"
    assert "cpu" in available_presets("pe_cad")
    module = r.load()
    assert callable(module.train) and module.Config.__name__ == "PECadConfig"


def test_load_config_of_planned_or_unknown_recipe(planned):
    with pytest.raises(RecipeNotReady):
        load_config("planned_demo", "smoke")
    with pytest.raises(UnknownRecipe):
        load_config("glm", "smoke")


def test_load_config_applies_preset_and_override():
    module, cfg = load_config("glam", "smoke", ["max_steps=3"])
    assert module.Config is GlamConfig
    assert isinstance(cfg, GlamConfig)
    assert cfg.max_steps == 3
    assert cfg.preset == "smoke"
    assert cfg.model.dim == 32  # from smoke.yaml
    assert cfg.seeds == [0, 1]


def test_load_config_default_preset_is_quick():
    _, cfg = load_config("glam")
    assert cfg.preset == "quick"
    assert cfg.model.dim == 128


def test_load_config_without_preset_uses_defaults():
    _, cfg = load_config("glam", None)
    assert cfg.preset == "custom"
    assert cfg == GlamConfig()


def test_load_config_unknown_preset_lists_available():
    with pytest.raises(ConfigError) as ei:
        load_config("glam", "enormous")
    assert "quick" in str(ei.value)
    assert "smoke" in str(ei.value)


def test_load_config_bad_override_is_config_error():
    with pytest.raises(ConfigError, match=re.escape("moe.num_experts")):
        load_config("glam", "smoke", ["moe.num_expert=2"])


def test_recipes_are_unique_and_frozen():
    assert len({r.name for r in registry.RECIPES}) == len(registry.RECIPES)
    with pytest.raises(AttributeError):
        registry.RECIPES[0].module = None  # type: ignore[misc]
