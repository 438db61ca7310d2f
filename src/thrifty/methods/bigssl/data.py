"""Data of the BigSSL recipe: the audio splits as cached log-mel features, nested label fractions, the LM text.

Sources (``data.source``): the synthetic espeak-ng corpus of :mod:`thrifty.data.speech` (default), the
LibriSpeech layout (plus Libri-Light-style unlabelled folders) or JSONL/CSV/TSV manifests, both read by
:mod:`thrifty.data.audio`. Every source ends as the same five roles:

* ``unlabelled`` — pre-training and noisy-student audio. Its transcripts (the synthetic corpus keeps them) are the
  *hidden truth*: training never reads them; only the pseudo-label quality report does, through a guarded read.
* ``labelled`` — the labelled pool, in a fixed seeded order; fraction ``f`` is its first ``ceil(f·N)`` utterances,
  so fractions are nested and identical for every arm and seed.
* ``dev`` — model selection, LM-weight tuning, the NST filter's fit and the pre-training held-out loss (guarded).
* ``test_in`` / ``test_ood`` (or the LibriSpeech test splits) — read once per fine-tuned model (guarded).

Features are computed once per manifest and front end and cached as float16 safetensors (one concatenated
(frames, 80) tensor plus offsets); the normaliser's mean/std come from the labelled + unlabelled audio only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from thrifty.core.run import progress
from thrifty.core.splits import AccessLog, Guarded
from thrifty.data import audio, speech
from thrifty.data.transcripts import normalize_transcript
from thrifty.methods.bigssl.config import BigSSLConfig
from thrifty.methods.bigssl.features import HOP, N_FFT, N_MELS, SAMPLE_RATE, LogMel, Normalizer
from thrifty.methods.bigssl.tokens import encode

log = logging.getLogger(__name__)
_FEATURE_VERSION = 1
DEV_PURPOSES = ("select", "tune", "nst_filter", "pretrain_val")
TEST_PURPOSES = ("test",)


@dataclasses.dataclass
class Split:
    """Utterances of one split with their normalised log-mel features.

    ``feats[i]`` is (T_i, n_mels) float16 (un-normalised); ``texts[i]`` the normalised transcript or None.
    """

    name: str
    ids: list[str]
    feats: list[torch.Tensor]
    texts: list[str | None]
    meta: list[dict[str, Any]]
    normalizer: Normalizer | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> list[int]:
        return [int(f.shape[0]) for f in self.feats]

    @property
    def hours(self) -> float:
        return sum(self.lengths) * HOP / SAMPLE_RATE / 3600

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised, zero-padded features (B, T_max, n_mels) float32 and lengths (B,)."""
        lengths = torch.tensor([self.feats[i].shape[0] for i in indices], dtype=torch.long)
        x = torch.zeros(len(indices), int(lengths.max()), self.feats[indices[0]].shape[1])
        for row, i in enumerate(indices):
            f = self.feats[i].float()
            x[row, : f.shape[0]] = self.normalizer(f) if self.normalizer is not None else f
        return x, lengths

    def targets(self, indices: list[int]) -> list[torch.Tensor]:
        out = []
        for i in indices:
            if self.texts[i] is None:
                raise ValueError(f"utterance {self.ids[i]} of split {self.name} has no transcript")
            out.append(torch.tensor(encode(self.texts[i]), dtype=torch.long))
        return out

    def subset(self, indices: list[int], *, name: str | None = None) -> Split:
        return Split(
            name or self.name,
            [self.ids[i] for i in indices],
            [self.feats[i] for i in indices],
            [self.texts[i] for i in indices],
            [self.meta[i] for i in indices],
            self.normalizer,
        )

    def with_texts(self, texts: list[str | None], *, name: str) -> Split:
        return Split(name, list(self.ids), list(self.feats), list(texts), list(self.meta), self.normalizer)

    def hidden(self) -> Split:
        """The same audio with transcripts removed (what training may see of the unlabelled split)."""
        return self.with_texts([None] * len(self), name=self.name)


def fraction_size(fraction: float, pool: int) -> int:
    return max(1, math.ceil(fraction * pool - 1e-9))


@dataclasses.dataclass
class SpeechData:
    unlabelled: Split  # transcripts removed
    unlabelled_truth: Guarded[list[str | None]]  # the hidden transcripts, for pseudo-label quality only
    labelled: Split  # the pool in its fixed order
    dev: Guarded[Split]
    tests: dict[str, Guarded[Split]]
    lm_texts: list[str]
    normalizer: Normalizer
    manifest: dict[str, Any]

    def labelled_fraction(self, fraction: float) -> Split:
        """The first ``ceil(fraction·N)`` utterances of the pool (nested across fractions)."""
        return self.labelled.subset(list(range(fraction_size(fraction, len(self.labelled)))))


# ------------------------------------------------------------------------------------------------ sources


def _synthetic_spec(cfg: BigSSLConfig) -> speech.SpeechCorpusSpec:
    d = cfg.data
    return speech.SpeechCorpusSpec(
        unlabelled=d.unlabelled,
        labelled=d.labelled,
        dev=d.dev,
        test_in=d.test_in,
        test_ood=d.test_ood,
        min_words=d.min_words,
        max_words=d.max_words,
        speed=tuple(d.speed),
        pitch=tuple(d.pitch),
        noise_prob=d.noise_prob,
        snr_db=tuple(d.snr_db),
        reverb_prob=d.reverb_prob,
        held_out_accent=d.held_out_accent,
        use_flite=d.use_flite,
        seed=d.seed,
        task=d.task,
    )


def _utterances(cfg: BigSSLConfig, cache: Path) -> tuple[dict[str, list[audio.Utterance]], dict[str, Any]]:
    """Role → utterances (``unlabelled``, ``labelled``, ``dev``, then one entry per test set)."""
    d = cfg.data
    if d.source == "synthetic":
        manifests = speech.build_corpus(
            cache / "speech", _synthetic_spec(cfg), workers=d.workers, progress=cfg.progress
        )
        roles = {name: audio.read_manifest(path) for name, path in manifests.items()}
        info = json.loads((next(iter(manifests.values())).parent / "complete.json").read_text())
        meta = {"corpus": str(next(iter(manifests.values())).parent), "voices": info.get("voices", {})}
        return roles, meta
    if d.source == "librispeech":
        if not d.root:
            raise ValueError("data.source=librispeech needs data.root (the LibriSpeech folder or its parent)")
        roles = {
            "labelled": audio.librispeech(d.root, d.labelled_splits, skip_bad=d.skip_bad),
            "dev": audio.librispeech(d.root, [d.dev_split], skip_bad=d.skip_bad),
        }
        if d.unlabelled_dir:
            roles["unlabelled"] = audio.unlabelled_folder(d.unlabelled_dir)
        else:
            roles["unlabelled"] = audio.librispeech(d.root, d.unlabelled_splits, skip_bad=d.skip_bad)
        for split in d.test_splits:
            roles[split] = audio.librispeech(d.root, [split], skip_bad=d.skip_bad)
        return roles, {"root": d.root}
    if not (d.labelled_manifest and d.dev_manifest and d.test_manifests):
        raise ValueError("data.source=manifest needs data.labelled_manifest, data.dev_manifest and data.test_manifests")
    roles = {
        "labelled": audio.read_manifest(d.labelled_manifest, skip_bad=d.skip_bad),
        "dev": audio.read_manifest(d.dev_manifest, skip_bad=d.skip_bad),
        "unlabelled": audio.read_manifest(d.unlabelled_manifest, skip_bad=d.skip_bad) if d.unlabelled_manifest else [],
    }
    for path in d.test_manifests:
        name = Path(path).stem
        if name in roles:  # "dev", "labelled", "unlabelled" or an earlier test set
            name = f"test_{name}"
        if name in roles:
            name = f"{name}_{Path(path).parent.name}"  # the same file name in another folder
        if name in roles:
            raise ValueError(
                f"data.test_manifests: two test sets would be called {name!r}; give the manifests distinct file names"
            )
        roles[name] = audio.read_manifest(path, skip_bad=d.skip_bad)
    return roles, {"manifests": [d.labelled_manifest, d.unlabelled_manifest, d.dev_manifest, *d.test_manifests]}


def _stamp(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def _feature_file(cache: Path, role: str, utts: list[audio.Utterance], max_seconds: float, skip_bad: bool) -> Path:
    """The cache file of one split's features: keyed by the front end, the filter settings and every file's path,
    size and modification time (a repaired or replaced file is read again)."""
    files = [(u.id, u.path, *_stamp(u.path)) for u in utts]
    key = hashlib.sha256(
        json.dumps([_FEATURE_VERSION, N_FFT, HOP, N_MELS, max_seconds, skip_bad, files], sort_keys=True).encode()
    ).hexdigest()[:16]
    return cache / "bigssl_features" / f"{role}-{key}.safetensors"


def _features(
    role: str, utts: list[audio.Utterance], cache: Path, *, max_seconds: float, skip_bad: bool, show: bool
) -> tuple[list[audio.Utterance], list[torch.Tensor], int]:
    """Log-mel features of ``utts`` (cached); drops utterances longer than ``max_seconds``. Returns the kept
    utterances, their features and the number skipped as bad files."""
    path = _feature_file(cache, role, utts, max_seconds, skip_bad)
    if path.exists():
        blob = load_file(str(path))
        offsets = blob["offsets"].tolist()
        keep = blob["keep"].tolist()
        kept = [utts[i] for i in keep]
        feats = [blob["feats"][offsets[k] : offsets[k + 1]] for k in range(len(kept))]
        return kept, feats, int(blob["bad"])
    logmel = LogMel()
    kept, feats, keep_idx, bad = [], [], [], 0
    with progress(len(utts), f"log-mel {role}", enabled=show) as advance:
        for i, u in enumerate(utts):
            try:
                wave = audio.read_audio(u.path, sample_rate=SAMPLE_RATE)
            except audio.AudioError:
                if not skip_bad:
                    raise
                bad += 1
                log.warning("skipping bad audio file %s", u.path)
                advance(1)
                continue
            if len(wave) > max_seconds * SAMPLE_RATE or len(wave) < 8 * HOP:  # too long, or too short to subsample
                advance(1)
                continue
            with torch.no_grad():
                feats.append(logmel(torch.from_numpy(wave)).to(torch.float16))
            kept.append(u)
            keep_idx.append(i)
            advance(1)
    if not feats:
        raise ValueError(f"no usable audio in the {role} split ({len(utts)} utterances, {bad} bad)")
    offsets = np.cumsum([0, *[f.shape[0] for f in feats]])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(
        {
            "feats": torch.cat(feats),
            "offsets": torch.from_numpy(offsets),
            "keep": torch.tensor(keep_idx, dtype=torch.long),
            "bad": torch.tensor(bad),
        },
        str(tmp),
    )
    tmp.replace(path)
    return kept, feats, bad


def _lm_texts(cfg: BigSSLConfig, used: set[str], labelled: list[str]) -> list[str]:
    """Sentences for the character LM, disjoint from every split's transcripts (synthetic); for real data the
    labelled transcripts (dev and test transcripts are never LM text)."""
    if cfg.data.source != "synthetic":
        return list(labelled)
    if not (cfg.decode.use_lm or cfg.nst.fusion):
        return []  # no stage decodes with the LM
    d = cfg.data
    spec = _synthetic_spec(cfg)
    pool = speech.task_texts(
        d.task,
        spec.total + cfg.decode.lm_sentences,
        sources=spec.sources,
        min_words=d.min_words,
        max_words=d.max_words,
        seed=d.seed,
    )
    return [s for s in pool if s not in used][: cfg.decode.lm_sentences]


def prepare_data(cfg: BigSSLConfig, cache: Path, access: AccessLog) -> SpeechData:
    """Build or load every split; see the module docstring for the roles."""
    roles, source_meta = _utterances(cfg, cache)
    if not roles.get("labelled"):
        raise ValueError("the labelled split is empty")
    splits: dict[str, Split] = {}
    bad_total = 0
    for role, utts in roles.items():
        if not utts:
            continue
        kept, feats, bad = _features(
            role, utts, cache, max_seconds=cfg.data.max_seconds, skip_bad=cfg.data.skip_bad, show=cfg.progress
        )
        bad_total += bad
        texts = [normalize_transcript(u.text) if u.text is not None else None for u in kept]
        meta = [{"duration": u.duration, "speaker": u.speaker} for u in kept]
        splits[role] = Split(role, [u.id for u in kept], feats, texts, meta)
    if "unlabelled" not in splits:
        raise ValueError("the recipe needs unlabelled audio for pre-training and noisy-student training")
    labelled = splits["labelled"]
    order = np.random.default_rng(cfg.data.seed).permutation(len(labelled)).tolist()
    labelled = labelled.subset(order)
    normalizer = Normalizer.fit(labelled.feats + splits["unlabelled"].feats)  # fit accumulates in float64
    for s in [*splits.values(), labelled]:
        s.normalizer = normalizer
    unlabelled = splits["unlabelled"]
    test_names = [r for r in splits if r not in ("unlabelled", "labelled", "dev")]
    used = {t for s in splits.values() for t in s.texts if t is not None}
    lm_texts = _lm_texts(cfg, used, [t for t in labelled.texts if t])
    sizes = {
        name: {"utterances": len(s), "hours": round(s.hours, 4)}
        for name, s in [("unlabelled", unlabelled), ("labelled", labelled)]
        + [(r, splits[r]) for r in ["dev", *test_names]]
    }
    manifest = {
        "source": cfg.data.source,
        **source_meta,
        "sizes": sizes,
        "bad_files_skipped": bad_total,
        "fractions": {str(f): fraction_size(f, len(labelled)) for f in cfg.finetune.fractions},
        "labelled_order_seed": cfg.data.seed,
        "lm_sentences": len(lm_texts),
        "normalizer": {"mean": normalizer.mean.mean().item(), "std": normalizer.std.mean().item()},
    }
    return SpeechData(
        unlabelled=unlabelled.hidden(),
        unlabelled_truth=Guarded("unlabelled_truth", list(unlabelled.texts), access, allowed=("pseudo_label_quality",)),
        labelled=labelled,
        dev=Guarded("dev", splits["dev"], access, allowed=DEV_PURPOSES),
        tests={name: Guarded(name, splits[name], access, allowed=TEST_PURPOSES) for name in test_names},
        lm_texts=lm_texts,
        normalizer=normalizer,
        manifest=manifest,
    )
