"""The explicit list of recipes. Nothing is discovered by import side effects.

A recipe module (e.g. ``thrifty.methods.glam.train``) exposes ``Config`` (its config dataclass) and
``train(cfg) -> dict`` (the whole recipe; returns what it wrote to ``results.json``).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib
from types import ModuleType


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One recipe: its paper, module, and where its claims are judged.

    Attributes:
        claim_preset: the pre-registered preset whose run (5 seeds, <= 45 min on 2 cores) judges the
            headline claims; its results are committed under ``docs/<name>/reference/``. ``None`` while a
            recipe has none yet (its ``cpu`` preset predates the claim protocol).
        headline: the claim id (a ``fnmatch`` pattern; the first match wins) the summary table shows.
    """

    name: str
    title: str
    arxiv: str
    domain: str
    module: str | None  # None: planned, not implemented yet
    claim_preset: str | None = None
    headline: str = ""

    def headline_claim(self, claims: list[dict]) -> dict | None:
        """The first of ``claims`` (``results.json`` records) whose id matches :attr:`headline`."""
        return next((c for c in claims if self.headline and fnmatch.fnmatchcase(c["id"], self.headline)), None)

    @property
    def ready(self) -> bool:
        return self.module is not None

    def load(self) -> ModuleType:
        if self.module is None:
            raise RecipeNotReady(
                f"recipe {self.name!r} ({self.title}) is planned but not implemented yet; "
                f"ready recipes: {', '.join(r.name for r in RECIPES if r.ready)}"
            )
        return importlib.import_module(self.module)


class UnknownRecipe(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class RecipeNotReady(RuntimeError):
    pass


RECIPES: tuple[Recipe, ...] = (
    Recipe(
        "glam",
        "GLaM: sparse mixture-of-experts language model",
        "2112.06905",
        "text",
        "thrifty.methods.glam.train",
        claim_preset="cpu",
        headline="moe_beats_dense_active",
    ),
    Recipe(
        "autodistill",
        "AutoDistill: distillation + multi-objective BO architecture search",
        "2201.08539",
        "text, serving",
        "thrifty.methods.autodistill.train",
        claim_preset="cpu",
        headline="searched_student_more_accurate_than_mobilebert_like",
    ),
    Recipe(
        "bigssl",
        "BigSSL: Conformer SSL pre-training + noisy-student ASR",
        "2109.13226",
        "speech",
        "thrifty.methods.bigssl.train",
        claim_preset="cpu",
        headline="pretraining_lowers_wer_*",
    ),
    Recipe(
        "genesis",
        "Models Genesis / Semantic Genesis / TransVW",
        "2007.06959, 2102.10680",
        "3D CT",
        "thrifty.methods.genesis.train",
        claim_preset="cpu",
        headline="genesis_off_beats_scratch_*",
    ),
    Recipe(
        "squid",
        "SQUID: memory-queue in-painting anomaly detection",
        "2111.13495",
        "X-ray",
        "thrifty.methods.squid.train",
        claim_preset="cpu",
        headline="squid_5_points_over_best_baseline",
    ),
    Recipe(
        "mt_transunet",
        "MT-TransUNet: joint lesion segmentation + classification",
        "2112.01767",
        "dermoscopy",
        "thrifty.methods.mt_transunet.train",
        claim_preset="cpu",
        headline="dual_raises_jaccard",
    ),
    Recipe(
        "data_assemble",
        "Data, assemble: partial labels across datasets",
        "2109.12265",
        "X-ray",
        "thrifty.methods.data_assemble.train",
        claim_preset="cpu",
        headline="assemble_beats_naive_target_auc",
    ),
    Recipe(
        "pe_cad",
        "Pulmonary-embolism CAD: CNN vs ViT, SSL vs supervised, CC vs MIL",
        "2109.07029",
        "CTPA",
        "thrifty.methods.pe_cad.train",
        claim_preset="cpu",
        headline="pretrained_beats_scratch_cnn_*",
    ),
    Recipe(
        "temporal_gradient",
        "Temporal-gradient semi-supervised action recognition",
        "2111.13241",
        "video",
        "thrifty.methods.temporal_gradient.train",
        claim_preset="cpu",
        headline="tg_beats_fixmatch_03",
    ),
)


def names(ready_only: bool = False) -> list[str]:
    return [r.name for r in RECIPES if r.ready or not ready_only]


def get(name: str) -> Recipe:
    """The recipe called ``name``; :class:`UnknownRecipe` lists the known ones and close matches."""
    for r in RECIPES:
        if r.name == name:
            return r
    close = difflib.get_close_matches(name, names(), n=2)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise UnknownRecipe(f"unknown recipe {name!r}.{hint} Known recipes: {', '.join(names())}")


def load_config(
    name: str, preset: str | None = "quick", overrides: list[str] | None = None
) -> tuple[ModuleType, object]:
    """Recipe module and its resolved config: dataclass defaults < preset YAML < ``key=value`` overrides.

    Raises:
        UnknownRecipe, RecipeNotReady, ConfigError (from :mod:`thrifty.core.config`).
    """
    from thrifty.core.config import load_config as _load
    from thrifty.core.config import preset_path

    module = get(name).load()
    path = preset_path(name, preset) if preset else None
    cfg = _load(module.Config, path, [*(["preset=" + preset] if preset else []), *(overrides or [])])
    return module, cfg
