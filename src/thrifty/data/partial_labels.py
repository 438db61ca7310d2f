"""Partial-label loaders and assembly for the "Data, Assemble" recipe (Label-Assemble).

Kang, Lu, Yuille and Zhou, *Label-Assemble: Leveraging Multiple Datasets with Partial Labels*
(arXiv 2109.12265; first titled "Data, Assemble"). Several sources, each labelled for its own set of findings,
are merged into one multi-label table whose *mask* says which labels were actually given for each image.

Nothing is downloaded: every function reads files already on disk.

* :class:`LabelTable`: image paths with a partial multi-label target (``labels`` and ``mask``, both ``(N, L)``),
  a patient id and a source name per row.
* Real-format scanners: :func:`scan_chestxray14` (NIH ChestX-ray14: ``Data_Entry_2017.csv``, PNGs under
  ``images*/`` or ``images*/images/``, the official ``train_val_list.txt`` / ``test_list.txt``),
  :func:`scan_chexpert_partial` (CheXpert ``train.csv`` / ``valid.csv`` with 1 / 0 / -1 / blank, the -1 and blank
  policies configurable) and :func:`scan_covidx` (COVIDx-style whitespace-separated split files with a
  configurable schema).
* :class:`SourceProtocol`: the label-protocol manifest of one source (which labels it provides, which it implies
  negative, how its column names map onto the shared names), with a JSON round trip, :func:`read_protocols` /
  :func:`write_protocols`, and :func:`check_protocols`, which lists conflicts between manifests.
* :func:`assemble` merges tables into one partial-label table over a shared label set, building the masks from the
  manifests; :func:`split_by_patient` splits rows so that no patient spans two splits; :func:`load_table_images`
  decodes the images through :func:`thrifty.data.images.load_image`.

**The file and column names are as recalled, not verified against the released data sets.** Every one of them
is a keyword argument (``csv_name``, ``columns=``, ``schema=``, ``findings=``, ...), so a mismatch is fixed by
the caller, not by editing this module. Every data problem raises :class:`~thrifty.data.images.ImageDataError`
naming the file (and the line, where there is one) and saying what was expected; bad arguments raise
``ValueError``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from thrifty.data.images import (
    CHEXPERT_FINDINGS,
    IMAGE_SUFFIXES,
    ImageDataError,
    _chexpert_cell,
    _csv_rows,
    _listing,
    _require_file,
    _resolve,
    _views,
    load_image,
)

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

CHESTXRAY14_FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
CHESTXRAY14_NO_FINDING = "No Finding"
CHESTXRAY14_COLUMNS: Mapping[str, str] = types.MappingProxyType(
    {"image": "Image Index", "labels": "Finding Labels", "patient": "Patient ID", "view": "View Position"}
)
CHESTXRAY14_SPLIT_FILES: Mapping[str, str] = types.MappingProxyType(
    {"train_val": "train_val_list.txt", "test": "test_list.txt"}
)
CHEXPERT_COLUMNS: Mapping[str, str] = types.MappingProxyType(
    {"path": "Path", "frontal": "Frontal/Lateral", "view": "AP/PA"}
)
CHEXPERT_PATIENT_PATTERN = r"patient\d+"
UNCERTAIN_POLICIES = ("missing", "ones", "zeros")
BLANK_POLICIES = ("missing", "negative")
COVIDX_SCHEMA = ("patient", "image", "label", "source")


# ----------------------------------------------------------------------------------------------- the table


@dataclasses.dataclass
class LabelTable:
    """Images with a partial multi-label target.

    ``labels`` is ``(N, L)`` float32 in {0, 1}, 0 wherever the label is missing; ``mask`` is ``(N, L)`` bool, True
    where the label was given. ``label_names`` names the L columns (unique); ``patient_ids`` and ``sources`` give
    each row's patient and source name. Construction checks shapes and values (``ValueError``).
    """

    paths: list[Path]
    labels: np.ndarray
    mask: np.ndarray
    label_names: tuple[str, ...]
    patient_ids: list[str]
    sources: list[str]

    def __post_init__(self) -> None:
        self.paths = [Path(p) for p in self.paths]
        self.labels = np.asarray(self.labels, dtype=np.float32)
        self.mask = np.asarray(self.mask, dtype=bool)
        if isinstance(self.label_names, str):
            raise ValueError(f"label_names must be a sequence of names, not the string {self.label_names!r}")
        self.label_names = tuple(str(n) for n in self.label_names)
        self.patient_ids = [str(p) for p in self.patient_ids]
        self.sources = [str(s) for s in self.sources]
        n, n_labels = len(self.paths), len(self.label_names)
        for what, arr in (("labels", self.labels), ("mask", self.mask)):
            if arr.shape != (n, n_labels):
                raise ValueError(f"LabelTable {what} has shape {arr.shape}, expected ({n}, {n_labels}) (rows, labels)")
        for what, seq in (("patient_ids", self.patient_ids), ("sources", self.sources)):
            if len(seq) != n:
                raise ValueError(f"LabelTable {what} has {len(seq)} entries for {n} rows")
        dupes = sorted({x for x in self.label_names if self.label_names.count(x) > 1})
        if dupes:
            raise ValueError(f"LabelTable label_names repeat {dupes}")
        if not np.isin(self.labels, (0.0, 1.0)).all():
            raise ValueError("LabelTable labels must be 0 or 1")
        if (self.labels[~self.mask] != 0).any():
            raise ValueError("LabelTable labels must be 0 where the mask says missing")

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: Sequence[int] | np.ndarray) -> LabelTable:
        """The rows ``idx`` (integer indices in the given order, or a boolean row mask) as a new table."""
        arr = np.asarray(idx)
        if arr.dtype == bool:
            if arr.shape != (len(self),):
                raise ValueError(f"boolean row mask has shape {arr.shape}, expected ({len(self)},)")
            arr = np.flatnonzero(arr)
        elif arr.size == 0:
            arr = np.zeros(0, dtype=np.int64)
        elif not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"row indices must be integers or a boolean mask, got dtype {arr.dtype}")
        if arr.ndim != 1:
            raise ValueError(f"row indices must be one-dimensional, got shape {arr.shape}")
        rows = [int(i) for i in arr]
        return LabelTable(
            paths=[self.paths[i] for i in rows],
            labels=self.labels[arr].copy(),
            mask=self.mask[arr].copy(),
            label_names=self.label_names,
            patient_ids=[self.patient_ids[i] for i in rows],
            sources=[self.sources[i] for i in rows],
        )


# ----------------------------------------------------------------------------------------------- protocols


def _names(value: Any, *, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"{what} must be a sequence of label names, got {value!r}")
    out = tuple(value)
    bad = [v for v in out if not isinstance(v, str) or not v]
    if bad:
        raise ValueError(f"{what} must hold non-empty strings, got {bad!r}")
    return out


@dataclasses.dataclass(frozen=True)
class SourceProtocol:
    """The label-protocol manifest of one source.

    * ``name``: the source name, matched against :attr:`LabelTable.sources`.
    * ``provides``: the shared label names this source gives a label for (where its own table's mask says so).
    * ``implies_negative``: shared label names *outside* ``provides`` that the source asserts are absent (0) in
      every one of its images, e.g. NIH ChestX-ray14, collected before 2020, implies "COVID-19" negative.
      :func:`assemble` gives them mask True and label 0 for every row of the source.
    * ``aliases``: source column name -> shared label name (applied once, not chained); a column without an alias
      keeps its own name.

    Conflicts (a label both provided and implied negative, ...) are not rejected here; :func:`check_protocols`
    lists them and :func:`assemble` refuses the ones that make a mask ambiguous.
    """

    name: str
    provides: tuple[str, ...]
    implies_negative: tuple[str, ...] = ()
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"SourceProtocol name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "provides", _names(self.provides, what=f"source {self.name!r} provides"))
        object.__setattr__(
            self, "implies_negative", _names(self.implies_negative, what=f"source {self.name!r} implies_negative")
        )
        if not isinstance(self.aliases, Mapping):
            raise ValueError(f"source {self.name!r} aliases must be a mapping column -> label, got {self.aliases!r}")
        bad = {k: v for k, v in self.aliases.items() if not (isinstance(k, str) and k and isinstance(v, str) and v)}
        if bad:
            raise ValueError(f"source {self.name!r} aliases must map non-empty strings to strings, got {bad!r}")
        object.__setattr__(self, "aliases", types.MappingProxyType(dict(self.aliases)))

    def __hash__(self) -> int:
        return hash((self.name, self.provides, self.implies_negative, tuple(sorted(self.aliases.items()))))

    def shared_name(self, column: str) -> str:
        """The shared label name of the source column ``column``."""
        return self.aliases.get(column, column)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` reads it back."""
        return {
            "name": self.name,
            "provides": list(self.provides),
            "implies_negative": list(self.implies_negative),
            "aliases": dict(self.aliases),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SourceProtocol:
        """Build from :meth:`to_dict`'s form; unknown or missing keys raise ``ValueError`` naming them."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a source protocol must be a mapping, got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ValueError(
                f"source protocol {data.get('name')!r} has unknown key(s) {unknown}; known keys are {known}"
            )
        missing = [k for k in ("name", "provides") if k not in data]
        if missing:
            raise ValueError(f"source protocol {data.get('name')!r} lacks required key(s) {missing}")
        return cls(**dict(data))


def read_protocols(path: PathLike) -> list[SourceProtocol]:
    """Source protocols from a JSON file holding one protocol object or a list of them."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ImageDataError(f"{path}: protocol file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ImageDataError(f"{path}: cannot read protocol file ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise ImageDataError(f"{path}:{exc.lineno}: protocol file is not valid JSON ({exc.msg})") from exc
    items = data if isinstance(data, list) else [data]
    out = []
    for i, item in enumerate(items):
        try:
            out.append(SourceProtocol.from_dict(item))
        except ValueError as exc:
            raise ImageDataError(f"{path}: protocol #{i}: {exc}") from exc
    return out


def write_protocols(path: PathLike, protocols: Sequence[SourceProtocol]) -> None:
    """Write ``protocols`` as a JSON list that :func:`read_protocols` reads back."""
    Path(path).write_text(json.dumps([p.to_dict() for p in protocols], indent=2) + "\n", encoding="utf-8")


def _fold(name: str) -> str:
    """A spelling-insensitive key: case-folded, spaces, underscores and hyphens removed."""
    return re.sub(r"[\s_\-]+", "", name).casefold()


def _protocol_conflicts(protocols: Sequence[SourceProtocol]) -> list[tuple[bool, str]]:
    """``(hard, message)`` per conflict; hard ones make :func:`assemble`'s masks ambiguous."""
    out: list[tuple[bool, str]] = []
    by_name: dict[str, int] = {}
    for p in protocols:
        by_name[p.name] = by_name.get(p.name, 0) + 1
    for name, count in by_name.items():
        if count > 1:
            out.append((True, f"source {name!r}: {count} protocols share this name"))
    for p in protocols:
        for what, names in (("provides", p.provides), ("implies_negative", p.implies_negative)):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                out.append((False, f"source {p.name!r}: {what} lists {dupes} more than once"))
        for label in sorted(set(p.provides) & set(p.implies_negative)):
            out.append((True, f"source {p.name!r}: label {label!r} is both provided and implied negative"))
        targets: dict[str, list[str]] = {}
        for column, shared in p.aliases.items():
            targets.setdefault(shared, []).append(column)
        for shared, columns in targets.items():
            if len(columns) > 1:
                out.append(
                    (False, f"source {p.name!r}: aliases map columns {sorted(columns)} onto one label {shared!r}")
                )
        for column, shared in p.aliases.items():
            if shared not in p.provides:
                out.append(
                    (
                        False,
                        f"source {p.name!r}: alias {column!r} -> {shared!r} names a label the source does not "
                        "provide (the column would be ignored)",
                    )
                )
    provided = {label for p in protocols for label in p.provides}
    for p in protocols:
        for label in p.implies_negative:
            if label not in provided:
                out.append(
                    (
                        False,
                        f"label {label!r}: implied negative by source {p.name!r} but provided by no source "
                        "(it would have no positive example)",
                    )
                )
            for q in protocols:
                if q.name == p.name:
                    continue
                for column, shared in q.aliases.items():
                    if shared == label and column != label:
                        out.append(
                            (
                                False,
                                f"label {label!r}: source {p.name!r} implies it negative while source {q.name!r} "
                                f"fills it from its column {column!r}; check both mean the same finding",
                            )
                        )
    spellings: dict[str, dict[str, list[str]]] = {}
    for p in protocols:
        for label in (*p.provides, *p.implies_negative):
            spellings.setdefault(_fold(label), {}).setdefault(label, [])
            if p.name not in spellings[_fold(label)][label]:
                spellings[_fold(label)][label].append(p.name)
    for variants in spellings.values():
        if len(variants) > 1:
            desc = "; ".join(f"{label!r} (source {', '.join(map(repr, srcs))})" for label, srcs in variants.items())
            out.append((False, f"labels spelled differently but probably the same finding: {desc}; add an alias"))
    return out


def check_protocols(protocols: Sequence[SourceProtocol]) -> list[str]:
    """Human-readable conflicts among ``protocols``; an empty list means none was found.

    Within one source:

    * a label both in ``provides`` and in ``implies_negative``;
    * a label listed twice in ``provides`` or in ``implies_negative``;
    * two alias columns mapping onto one shared name;
    * an alias onto a name the source does not provide (its column would be ignored).

    Across sources:

    * two protocols with the same ``name``;
    * a label implied negative by some source but provided by none (it could never be positive);
    * a label one source implies negative while another fills it through an alias from a column of a different
      name (the two sources may not mean the same finding);
    * names that differ only in case, spaces, underscores or hyphens ("Pleural_Thickening" vs "Pleural
      Thickening"): probably one finding under two names.

    :func:`assemble` raises on two of these, which leave a mask undefined (a label both provided and implied
    negative; two protocols with one name), and logs the rest as warnings.
    """
    return [msg for _, msg in _protocol_conflicts(protocols)]


# ----------------------------------------------------------------------------------------------- file helpers


def _column_names(columns: Mapping[str, str] | None, defaults: Mapping[str, str]) -> dict[str, str]:
    merged = dict(defaults)
    if columns is not None:
        unknown = sorted(set(columns) - set(defaults))
        if unknown:
            raise ValueError(f"unknown column key(s) {unknown}; the keys are {sorted(defaults)}")
        merged.update(columns)
    return merged


def _text_lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
    """``(line number, stripped text)`` for each non-blank line not starting with ``#``."""
    _require_file(path, what)
    try:
        with open(path, encoding="utf-8-sig") as fh:
            for number, raw in enumerate(fh, start=1):
                text = raw.strip()
                if text and not text.startswith("#"):
                    yield number, text
    except UnicodeDecodeError as exc:
        raise ImageDataError(f"{path}: {what} is not UTF-8 text ({exc})") from exc


def _image_index(root: Path, pattern: str) -> tuple[dict[str, Path], list[Path]]:
    """Image file name -> path over ``root/<pattern>/`` and ``root/<pattern>/images/``, and the folders searched."""
    dirs = sorted(d for d in root.glob(pattern) if d.is_dir() and not d.name.startswith("."))
    if not dirs:
        raise ImageDataError(f"{root}: no image folder matches {pattern!r}; found: {_listing(root)}")
    index: dict[str, Path] = {}
    searched: list[Path] = []
    for d in dirs:
        for sub in (d, d / "images"):
            if not sub.is_dir() or sub in searched:
                continue
            searched.append(sub)
            with os.scandir(sub) as entries:
                for entry in entries:
                    if entry.name.startswith(".") or Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES:
                        continue
                    if not entry.is_file():
                        continue
                    prev = index.get(entry.name)
                    if prev is not None:
                        raise ImageDataError(f"{root}: image {entry.name!r} is present twice: {prev} and {entry.path}")
                    index[entry.name] = Path(entry.path)
    return index, searched


# ----------------------------------------------------------------------------------------------- ChestX-ray14


def scan_chestxray14(
    root: PathLike,
    *,
    csv_name: str = "Data_Entry_2017.csv",
    image_dirs: str = "images*",
    split: str | None = None,
    columns: Mapping[str, str] | None = None,
    views: Iterable[str] | None = None,
    separator: str = "|",
    findings: Sequence[str] = CHESTXRAY14_FINDINGS,
    no_finding: str = CHESTXRAY14_NO_FINDING,
    name: str = "chestxray14",
) -> LabelTable:
    """NIH ChestX-ray14 as a :class:`LabelTable` with all ``findings`` given (mask True), rows in CSV order.

    ``root/csv_name`` is read with the columns of :data:`CHESTXRAY14_COLUMNS`, any of them overridden by
    ``columns`` (keys ``image``, ``labels``, ``patient``, ``view``; ``view`` is needed only when filtering by
    ``views``). "Finding Labels" is split on ``separator``; each part must be one of ``findings``, or the whole
    value ``no_finding`` (all negative). ``split`` ``"train_val"`` / ``"test"`` keeps the images named in
    ``root/train_val_list.txt`` / ``root/test_list.txt`` (:data:`CHESTXRAY14_SPLIT_FILES`); a listed image absent
    from the CSV raises. ``views`` (e.g. ``("PA",)``, case-insensitive) keeps those view positions.

    Images are found by file name in folders matching ``root/<image_dirs>`` and their ``images/`` subfolders (the
    NIH archives unpack to ``images_001/images/...``); the name index is built once. A kept row whose image is
    in none of them raises.
    """
    root = Path(root)
    if split is not None and split not in CHESTXRAY14_SPLIT_FILES:
        raise ValueError(f"split must be None or one of {list(CHESTXRAY14_SPLIT_FILES)}, got {split!r}")
    if not separator:
        raise ValueError("separator must be a non-empty string")
    findings = _names(findings, what="findings")
    cols = _column_names(columns, CHESTXRAY14_COLUMNS)
    view_set = _views(views)
    if not root.is_dir():
        raise ImageDataError(f"{root}: ChestX-ray14 folder does not exist")
    csv_path = root / csv_name
    _require_file(csv_path, "ChestX-ray14 label CSV")
    required = {k: cols[k] for k in ("image", "labels", "patient")}
    if view_set is not None:
        required["view"] = cols["view"]
    finding_index = {f: j for j, f in enumerate(findings)}

    rows: list[tuple[int, str, np.ndarray, str, str]] = []  # line, image, label vector, patient, view
    seen: dict[str, int] = {}
    for line, row in _csv_rows(csv_path, required, "ChestX-ray14 label CSV"):
        image = row[cols["image"]]
        if not image:
            raise ImageDataError(f"{csv_path}:{line}: empty {cols['image']!r}")
        if image in seen:
            raise ImageDataError(f"{csv_path}:{line}: image {image!r} already listed on line {seen[image]}")
        seen[image] = line
        patient = row[cols["patient"]]
        if not patient:
            raise ImageDataError(f"{csv_path}:{line}: empty {cols['patient']!r} for image {image!r}")
        raw = row[cols["labels"]]
        vec = np.zeros(len(findings), dtype=np.float32)
        if raw != no_finding:
            for part in raw.split(separator):
                part = part.strip()
                if part not in finding_index:
                    expected = f"one of {list(findings)} joined by {separator!r}, or {no_finding!r} alone"
                    got = "an empty label" if not part else f"{part!r}"
                    raise ImageDataError(
                        f"{csv_path}:{line}: column {cols['labels']!r} has {got} in {raw!r}; expected {expected}"
                    )
                vec[finding_index[part]] = 1.0
        rows.append((line, image, vec, patient, row.get(cols["view"], "")))

    if split is not None:
        list_path = root / CHESTXRAY14_SPLIT_FILES[split]
        keep: set[str] = set()
        for line, image in _text_lines(list_path, f"ChestX-ray14 {split} list"):
            if image not in seen:
                raise ImageDataError(f"{list_path}:{line}: image {image!r} is not in {csv_path}")
            keep.add(image)
        rows = [r for r in rows if r[1] in keep]
    if view_set is not None:
        rows = [r for r in rows if r[4].upper() in view_set]

    index, searched = _image_index(root, image_dirs)
    paths: list[Path] = []
    for line, image, *_ in rows:
        found = index.get(image)
        if found is None:
            where = ", ".join(str(s) for s in searched)
            raise ImageDataError(f"{csv_path}:{line}: image {image!r} not found in any of: {where}")
        paths.append(found)
    n = len(rows)
    labels = np.stack([r[2] for r in rows]) if rows else np.zeros((0, len(findings)), dtype=np.float32)
    return LabelTable(
        paths=paths,
        labels=labels,
        mask=np.ones((n, len(findings)), dtype=bool),
        label_names=findings,
        patient_ids=[r[3] for r in rows],
        sources=[name] * n,
    )


# ----------------------------------------------------------------------------------------------- CheXpert


def scan_chexpert_partial(
    csv_path: PathLike,
    *,
    image_root: PathLike | None = None,
    views: Iterable[str] | None = ("PA", "AP"),
    frontal_only: bool = True,
    uncertain: str = "missing",
    blank: str = "missing",
    findings: Sequence[str] | None = None,
    columns: Mapping[str, str] | None = None,
    patient_pattern: str = CHEXPERT_PATIENT_PATTERN,
    name: str = "chexpert",
) -> LabelTable:
    """A CheXpert CSV (``train.csv`` / ``valid.csv``) as a partial-label :class:`LabelTable`, rows in CSV order.

    Each of ``findings`` (default: the 14 observations of :data:`thrifty.data.images.CHEXPERT_FINDINGS`) is coded
    1 / 0 / -1 / blank (``1.0`` etc. accepted); any other value raises. ``uncertain`` decides -1: ``"missing"``
    (mask False), ``"ones"`` (given, 1) or ``"zeros"`` (given, 0); ``blank`` decides an empty cell:
    ``"missing"`` or ``"negative"`` (given, 0).

    Rows: a frontal row (``Frontal/Lateral`` = "Frontal") is kept when its ``AP/PA`` is in ``views``
    (case-insensitive; ``None`` keeps every frontal row); lateral rows are kept only when ``frontal_only`` is
    False. ``columns`` overrides :data:`CHEXPERT_COLUMNS` (keys ``path``, ``frontal``, ``view``).

    The patient id is the first match of the regular expression ``patient_pattern`` in the ``Path`` value
    (``".../patient00001/study1/view1_frontal.jpg"`` -> ``"patient00001"``; with a group, group 1); a path it
    does not match raises. Each path is resolved against ``image_root`` when given, else against the CSV's
    grandparent, then its parent (the archive's ``CheXpert-v1.0-small/train.csv`` holds paths starting with
    ``CheXpert-v1.0-small/``); a file found under none raises.
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}")
    if blank not in BLANK_POLICIES:
        raise ValueError(f"blank must be one of {BLANK_POLICIES}, got {blank!r}")
    names = _names(CHEXPERT_FINDINGS if findings is None else findings, what="findings")
    cols = _column_names(columns, CHEXPERT_COLUMNS)
    view_set = _views(views)
    try:
        pattern = re.compile(patient_pattern)
    except re.error as exc:
        raise ValueError(f"patient_pattern {patient_pattern!r} is not a regular expression ({exc})") from exc
    csv_path = Path(csv_path)
    _require_file(csv_path, "CheXpert CSV")
    roots = [Path(image_root)] if image_root is not None else [csv_path.parent.parent, csv_path.parent]
    required = {"path": cols["path"]}
    if frontal_only or view_set is not None:
        required["frontal"] = cols["frontal"]
    if view_set is not None:
        required["view"] = cols["view"]
    required.update({f"finding {f}": f for f in names})
    uncertain_value = {"missing": None, "ones": 1.0, "zeros": 0.0}[uncertain]
    blank_value = None if blank == "missing" else 0.0

    paths: list[Path] = []
    label_rows: list[np.ndarray] = []
    mask_rows: list[np.ndarray] = []
    patients: list[str] = []
    for line, row in _csv_rows(csv_path, required, "CheXpert CSV"):
        if "frontal" in required:
            frontal = row[cols["frontal"]].lower() == "frontal"
            if frontal_only and not frontal:
                continue
            if frontal and view_set is not None and row[cols["view"]].upper() not in view_set:
                continue
        vec = np.zeros(len(names), dtype=np.float32)
        given = np.zeros(len(names), dtype=bool)
        for j, f in enumerate(names):
            value = _chexpert_cell(row[f], csv_path=csv_path, line=line, column=f)
            if value is None:
                value = blank_value
            elif value == -1.0:
                value = uncertain_value
            if value is not None:
                vec[j], given[j] = value, True
        rel = row[cols["path"]]
        if not rel:
            raise ImageDataError(f"{csv_path}:{line}: empty {cols['path']!r}")
        match = pattern.search(rel)
        if match is None:
            raise ImageDataError(
                f"{csv_path}:{line}: no patient id in {rel!r}; expected a match of {patient_pattern!r}"
            )
        resolved = _resolve(rel, roots)
        if resolved is None:
            tried = ", ".join(str(r) for r in roots)
            raise ImageDataError(f"{csv_path}:{line}: image {rel!r} not found under any of: {tried}")
        paths.append(resolved)
        label_rows.append(vec)
        mask_rows.append(given)
        patients.append(match.group(1) if pattern.groups else match.group(0))
    n = len(paths)
    return LabelTable(
        paths=paths,
        labels=np.stack(label_rows) if n else np.zeros((0, len(names)), dtype=np.float32),
        mask=np.stack(mask_rows) if n else np.zeros((0, len(names)), dtype=bool),
        label_names=names,
        patient_ids=patients,
        sources=[name] * n,
    )


# ----------------------------------------------------------------------------------------------- COVIDx


def scan_covidx(
    split_file: PathLike,
    *,
    image_root: PathLike,
    schema: Sequence[str] = COVIDX_SCHEMA,
    positive: str | Sequence[str] = "positive",
    negative: str | Sequence[str] = "negative",
    label_name: str = "COVID-19",
    name: str = "covidx",
) -> LabelTable:
    """A COVIDx-style split file (e.g. COVIDx-CXR2 ``train.txt``) as a one-label :class:`LabelTable`.

    One image per line, fields separated by whitespace and named by ``schema`` (default
    ``patient image label source``; other names are allowed and ignored). ``schema`` must name ``image`` and
    ``label``. A label in ``positive`` is 1, one in ``negative`` is 0 (both always given); any other value, a
    line with the wrong number of fields, a repeated image or a missing ``image_root/<image>`` raises, naming the
    line. With a ``source`` field the patient id is ``"<source>/<patient>"``, so equal ids from different origins
    are not merged; without a ``patient`` field every image counts as its own patient. Blank lines and lines
    starting with ``#`` are skipped.
    """
    schema = _names(schema, what="schema")
    dupes = sorted({s for s in schema if schema.count(s) > 1})
    if dupes:
        raise ValueError(f"schema repeats {dupes}")
    missing = [k for k in ("image", "label") if k not in schema]
    if missing:
        raise ValueError(f"schema {list(schema)} lacks field(s) {missing}")
    pos = {positive} if isinstance(positive, str) else set(positive)
    neg = {negative} if isinstance(negative, str) else set(negative)
    if pos & neg:
        raise ValueError(f"label value(s) {sorted(pos & neg)} are both positive and negative")
    if not pos:
        raise ValueError("positive must name at least one label value")
    split_file, image_root = Path(split_file), Path(image_root)
    if not image_root.is_dir():
        raise ImageDataError(f"{image_root}: COVIDx image folder does not exist")
    field = {k: i for i, k in enumerate(schema)}
    expected_values = sorted(pos) + sorted(neg)

    paths: list[Path] = []
    values: list[float] = []
    patients: list[str] = []
    seen: dict[str, int] = {}
    for line, text in _text_lines(split_file, "COVIDx split file"):
        parts = text.split()
        if len(parts) != len(schema):
            raise ImageDataError(
                f"{split_file}:{line}: {len(parts)} whitespace-separated field(s), expected {len(schema)} "
                f"({' '.join(schema)})"
            )
        image, label = parts[field["image"]], parts[field["label"]]
        if label in pos:
            values.append(1.0)
        elif label in neg:
            values.append(0.0)
        else:
            raise ImageDataError(f"{split_file}:{line}: label {label!r}; expected one of {expected_values}")
        if image in seen:
            raise ImageDataError(f"{split_file}:{line}: image {image!r} already listed on line {seen[image]}")
        seen[image] = line
        path = image_root / image
        if not path.is_file():
            raise ImageDataError(f"{split_file}:{line}: image {image!r} not found under {image_root}")
        paths.append(path)
        patient = parts[field["patient"]] if "patient" in field else image
        if "source" in field:
            patient = f"{parts[field['source']]}/{patient}"
        patients.append(patient)
    n = len(paths)
    return LabelTable(
        paths=paths,
        labels=np.asarray(values, dtype=np.float32).reshape(n, 1),
        mask=np.ones((n, 1), dtype=bool),
        label_names=(label_name,),
        patient_ids=patients,
        sources=[name] * n,
    )


# ----------------------------------------------------------------------------------------------- assembly


def assemble(
    tables: Sequence[LabelTable],
    *,
    protocols: Sequence[SourceProtocol] | None = None,
    label_names: Sequence[str] | None = None,
) -> LabelTable:
    """One partial-label table over the rows of ``tables`` (in order) and a shared label set.

    Each row is read through the protocol of its source (:attr:`LabelTable.sources`): a column's shared name is
    its alias or its own name; a label in ``provides`` keeps the row's own label and mask; a label in
    ``implies_negative`` is given as 0 (mask True); every other label is missing (mask False, label 0), as are
    the table's columns the protocol does not provide. Without ``protocols`` every source provides all of its
    table's columns under their own names.

    ``label_names`` fixes the label set and order (labels outside it are dropped); by default it is the union, in
    order of first appearance (tables in order; per source its provided, then its implied labels).

    Raises ``ValueError`` for: a source without a protocol, a duplicate protocol name, a label a protocol both
    provides and implies negative, a provided label the source's table has no column for, two columns of one
    table mapped onto one name. A row that the data label positive for a label its protocol implies negative
    raises :class:`ImageDataError`. The other :func:`check_protocols` findings are logged as warnings.
    """
    tables = list(tables)
    if not tables:
        raise ValueError("assemble needs at least one table")
    by_source: dict[str, SourceProtocol] = {}
    if protocols is not None:
        conflicts = _protocol_conflicts(protocols)
        hard = [msg for is_hard, msg in conflicts if is_hard]
        if hard:
            raise ValueError("conflicting source protocols: " + "; ".join(hard))
        for msg in (msg for is_hard, msg in conflicts if not is_hard):
            log.warning("source protocols: %s", msg)
        by_source = {p.name: p for p in protocols}

    # per table and source: (row indices, protocol, shared name -> column index)
    plans: list[list[tuple[np.ndarray, SourceProtocol, dict[str, int]]]] = []
    union: dict[str, None] = {}
    for t_i, table in enumerate(tables):
        sources = np.asarray(table.sources, dtype=object)
        plan = []
        for source in dict.fromkeys(table.sources):
            if protocols is None:
                proto = SourceProtocol(name=source, provides=table.label_names)
            elif source in by_source:
                proto = by_source[source]
            else:
                raise ValueError(f"table #{t_i}: source {source!r} has no protocol; protocols cover {list(by_source)}")
            columns: dict[str, int] = {}
            for c, column in enumerate(table.label_names):
                shared = proto.shared_name(column)
                if shared in columns:
                    other = table.label_names[columns[shared]]
                    raise ValueError(
                        f"table #{t_i}, source {source!r}: columns {other!r} and {column!r} both map to {shared!r}"
                    )
                columns[shared] = c
            absent = [label for label in proto.provides if label not in columns]
            if absent:
                raise ValueError(
                    f"table #{t_i}, source {source!r}: the protocol provides {absent} but the table has no column "
                    f"for them; its columns are {list(table.label_names)}, aliases {dict(proto.aliases)}"
                )
            rows = np.flatnonzero(sources == source)
            for label in proto.implies_negative:
                if label in columns:
                    c = columns[label]
                    hit = rows[table.mask[rows, c] & (table.labels[rows, c] == 1.0)]
                    if hit.size:
                        raise ImageDataError(
                            f"{table.paths[hit[0]]}: source {source!r} implies {label!r} negative, but its table "
                            f"labels it positive ({hit.size} row(s) of table #{t_i})"
                        )
            plan.append((rows, proto, columns))
            union.update(dict.fromkeys(proto.provides))
            union.update(dict.fromkeys(proto.implies_negative))
        plans.append(plan)

    if label_names is None:
        names = tuple(union)
    else:
        names = _names(label_names, what="label_names")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"label_names repeats {dupes}")
        unused = [n for n in names if n not in union]
        if unused:
            log.warning("assemble: no source provides or implies %s; they are missing for every row", unused)
    target = {n: j for j, n in enumerate(names)}

    total = sum(len(t) for t in tables)
    labels = np.zeros((total, len(names)), dtype=np.float32)
    mask = np.zeros((total, len(names)), dtype=bool)
    offset = 0
    for table, plan in zip(tables, plans):
        for rows, proto, columns in plan:
            out_rows = rows + offset
            for label in proto.provides:
                if label in target:
                    j, c = target[label], columns[label]
                    labels[out_rows, j] = table.labels[rows, c]
                    mask[out_rows, j] = table.mask[rows, c]
            for label in proto.implies_negative:
                if label in target:
                    mask[out_rows, target[label]] = True  # labels stay 0
        offset += len(table)
    return LabelTable(
        paths=[p for t in tables for p in t.paths],
        labels=labels,
        mask=mask,
        label_names=names,
        patient_ids=[p for t in tables for p in t.patient_ids],
        sources=[s for t in tables for s in t.sources],
    )


# ----------------------------------------------------------------------------------------------- splitting, loading


def split_by_patient(table: LabelTable, *, fractions: Mapping[str, float], seed: int) -> dict[str, np.ndarray]:
    """Sorted row indices per split name, with every patient's rows in exactly one split.

    A patient is a ``(source, patient_id)`` pair, so equal ids from different sources are different patients.
    Patients are shuffled by ``seed`` (deterministically: the result depends only on the table, ``fractions``
    and ``seed``) and laid end to end; each goes to the split whose share of the rows holds the middle of its
    rows, so split sizes follow ``fractions`` up to one patient's rows. ``fractions`` must be non-negative and
    sum to 1 (else ``ValueError``); the result has one entry per split, in the order given.
    """
    if not fractions:
        raise ValueError("fractions must name at least one split")
    names = list(fractions)
    values = [float(fractions[n]) for n in names]
    bad = {n: v for n, v in zip(names, values) if not math.isfinite(v) or v < 0}
    if bad:
        raise ValueError(f"fractions must be finite and >= 0, got {bad}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {sum(values):.6g} for {dict(zip(names, values))}")
    keys = list(zip(table.sources, table.patient_ids))
    patients = sorted(set(keys))
    group_index = {k: i for i, k in enumerate(patients)}
    group = np.asarray([group_index[k] for k in keys], dtype=np.int64)
    sizes = np.bincount(group, minlength=len(patients))
    ends = np.cumsum(values) * len(table)
    assign = np.zeros(len(patients), dtype=np.int64)
    perm = np.random.default_rng(seed).permutation(len(patients))
    middle = np.cumsum(sizes[perm]) - sizes[perm] / 2.0  # each patient's middle row in the shuffled order
    assign[perm] = np.minimum(np.searchsorted(ends, middle, side="right"), len(names) - 1)
    row_split = assign[group] if len(table) else np.zeros(0, dtype=np.int64)
    return {n: np.flatnonzero(row_split == k).astype(np.int64) for k, n in enumerate(names)}


def load_table_images(table: LabelTable, *, size: int) -> np.ndarray:
    """The table's images as ``(N, 1, size, size)`` float32 in [0, 1], via :func:`~thrifty.data.images.load_image`.

    Grayscale, shorter side resized to ``size`` and center-cropped. A bad file raises
    :class:`~thrifty.data.images.ImageDataError` naming it and its row.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    out = np.empty((len(table), 1, size, size), dtype=np.float32)
    for i, path in enumerate(table.paths):
        try:
            out[i, 0] = load_image(path, grayscale=True, size=size)
        except ImageDataError as exc:
            raise ImageDataError(f"{exc} (row {i} of the table, source {table.sources[i]!r})") from exc
    return out
