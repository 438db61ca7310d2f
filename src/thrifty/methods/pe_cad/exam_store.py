"""The streamed data path of the PE CAD recipe (``data.store: exams``): one file per preprocessed exam, read lazily.

At the paper's scale (RSNA-STR: about 7,300 exams x 250 slices at 576²) the slices of a split do not fit in memory,
so instead of one ``.npz`` per split (``data.store: memory``) every exam is preprocessed once and written as its own
safetensors file, and :class:`ExamStore` reads only the slices a batch needs.

On disk, under the data cache directory of the split settings (the same digest as the in-memory cache)::

    <cache>/exams/<split>/<StudyInstanceUID>.safetensors   # one exam (file name: exam_file_name)
    <cache>/exams/<split>/index.json                       # the split's exams in order, written last

An exam file holds ``slices`` float16 (S, H, W) (windowed, lung-cropped, resized, ascending z), ``slice_labels``
uint8 (S,), ``exam_labels`` uint8 (9,), ``trivial`` float64 (S, G) (the defect-fraction baseline) and, for the
splits that keep them (synthetic validation), ``masks`` uint8 (S, H, W); its metadata names the study, the settings
digest and the format. ``index.json`` lists every exam's study id, file, slice count, exam labels and slice labels
(a string of 0/1), so the labels and counts of a split are known without opening its exam files.

Building is resumable and shardable (:func:`build_exam_split`): an exam file of these settings already present is
kept, a missing one (or one of other settings) is written crash-safely (:func:`save_safetensors_atomic`: a temporary
file in the same directory, fsynced, renamed over the file, the directory fsynced), and an unreadable or inconsistent
one (a torn write, a damaged disk) is logged as a warning naming it and rewritten. Temporary files left by killed
writes are removed when the build starts, and study ids that would share a file name are refused before anything is
written. Under ``torchrun`` the exams are dealt round-robin to the ranks (:func:`dealt`, as the feature extraction
deals them) and rank 0 writes the index after a barrier (:func:`after_shards`); the index requires every exam file to
hold slices of one H x W and the same tensors (``masks`` in all or none). A corrupt file met when *reading* an open
store raises :class:`CorruptExamFile` naming it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from thrifty.core import distributed
from thrifty.core.run import atomic_write_bytes, write_json

log = logging.getLogger(__name__)

EXAM_FORMAT = 1
EXAM_INDEX = "index.json"
#: the tensors every exam file holds (``masks`` is optional)
EXAM_KEYS = ("slices", "slice_labels", "exam_labels", "trivial")
_READ_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError)

IndexLike = torch.Tensor | np.ndarray | Sequence[int] | slice


class CorruptExamFile(ValueError):
    """A per-exam file that exists but cannot be used (unreadable, truncated, inconsistent); the message names it."""


# --------------------------------------------------------------------------------------------- shared helpers


def exam_file_name(study_id: str) -> str:
    """An exam's file name: its study id with anything outside ``[A-Za-z0-9._-]`` replaced by ``_``, plus
    ``.safetensors`` (a DICOM UID stays as it is). Shared by the exam store and the per-exam feature files."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", str(study_id)).lstrip(".") or "_"
    return f"{name}.safetensors"


#: a temporary file of :func:`save_safetensors_atomic`: ``.<file name>.<pid>.tmp`` next to the file
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.tmp")


def temp_path(path: Path) -> Path:
    """The temporary file this process writes ``path`` through: ``.<name>.<pid>.tmp`` in the same directory (so the
    rename stays on one file system)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def save_safetensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` to ``path`` crash-safely: serialised in memory (``safetensors.torch.save``) and written
    through :func:`temp_path` by :func:`~thrifty.core.run.atomic_write_bytes` (fsynced, renamed over ``path``, the
    directory fsynced). A killed process or a power loss leaves the old file or the new one, never a torn one; at
    worst a stale temporary file, which :func:`remove_stale_temps` clears. Used by the exam store and the per-exam
    feature files alike."""
    atomic_write_bytes(path, save(tensors, metadata=metadata), temp=temp_path(path), sync_dir=True)


def remove_stale_temps(directory: Path, names: set[str]) -> list[Path]:
    """Remove the temporary files (:func:`temp_path`) that killed writes of the files ``names`` left in
    ``directory``; returns them. Only for files no other live process is writing (a build's own share of exams)."""
    if not Path(directory).is_dir():
        return []
    removed = []
    with os.scandir(directory) as entries:
        for entry in entries:
            m = _TEMP.fullmatch(entry.name)
            if m and m["name"] in names and entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink(missing_ok=True)
                removed.append(Path(entry.path))
    return removed


def safetensors_metadata(path: Path) -> dict[str, str] | None:
    """The metadata of a safetensors file; None when the file is missing or unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except _READ_ERRORS:
        return None


def dealt(num_exams: int, *, rank: int, world_size: int) -> range:
    """The exams rank ``rank`` of ``world_size`` handles when exams are dealt round-robin: r, r + W, r + 2W, ..."""
    return range(rank, num_exams, world_size)


def after_shards(write_index: Callable[[], None], *, rank: int, world_size: int) -> None:
    """Once every rank has written its exams: rank 0 calls ``write_index`` and the others wait for it."""
    if world_size > 1:
        distributed.barrier()
    if rank == 0:
        write_index()
    if world_size > 1:
        distributed.barrier()


def stack_neighbours(rows: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Global slice indices (n,) -> (n, 3) the indices of slices i-1, i, i+1 of the same exam, the first and last
    slice of an exam replicating themselves (``stage1.stack_slices``). ``offsets``: (E + 1,) exam boundaries."""
    rows = np.asarray(rows, dtype=np.int64)
    exam = np.searchsorted(offsets, rows, side="right") - 1
    start, end = offsets[exam], offsets[exam + 1]
    return np.stack([np.maximum(rows - 1, start), rows, np.minimum(rows + 1, end - 1)], 1)


def as_rows(idx: IndexLike, n: int) -> np.ndarray:
    """Slice indices -> int64 (k,) in [0, n), as ``ExamSet.stacks`` reads them: a slice; integer indices (tensor,
    array or sequence); or a boolean mask of length n (its True rows, in order). IndexError for an index out of
    range or a mask of another length; TypeError for any other dtype (float indices are not truncated)."""
    if isinstance(idx, slice):
        return np.arange(*idx.indices(n), dtype=np.int64)
    rows = idx.cpu().numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx)
    if rows.size == 0:  # an empty list is float64 to numpy
        return np.zeros(0, dtype=np.int64)
    if rows.dtype == np.bool_:
        if rows.shape != (n,):
            raise IndexError(f"a boolean mask of slices needs shape ({n},), got {rows.shape}")
        return np.flatnonzero(rows).astype(np.int64)
    if not np.issubdtype(rows.dtype, np.integer):
        raise TypeError(f"slice indices must be integers or a boolean mask, got dtype {rows.dtype}")
    rows = rows.astype(np.int64).reshape(-1)
    if rows.min() < 0 or rows.max() >= n:
        raise IndexError(f"slice index out of range [0, {n}): {int(rows.min())}..{int(rows.max())}")
    return rows


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Sorted unique indices -> their maximal runs of consecutive values as ``[start, stop)`` pairs."""
    if not rows.size:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts, stops = np.r_[rows[0], rows[breaks]], np.r_[rows[breaks - 1], rows[-1]] + 1
    return list(zip(starts.tolist(), stops.tolist()))


class ExamOffsets:
    """What a split's exams derive from their boundaries, for every holder of them (the in-memory
    :class:`~thrifty.methods.pe_cad.data.ExamSet` and :class:`ExamStore`, the stage-1 features in memory or in
    their files): ``offsets`` int64 (E + 1,), exam e holding global slices ``offsets[e] : offsets[e + 1]``, and
    ``slice_labels`` uint8 (N,)."""

    offsets: np.ndarray
    slice_labels: np.ndarray

    def __len__(self) -> int:
        return self.num_exams

    @property
    def num_exams(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_slices(self) -> int:
        return int(self.offsets[-1])

    @property
    def slice_counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    @functools.cached_property
    def exam_of(self) -> np.ndarray:
        """(N,) the exam of every slice."""
        return np.repeat(np.arange(self.num_exams), self.slice_counts)

    def exam_any_pe(self) -> np.ndarray:
        """(E,) 1 where the exam has a PE-positive slice."""
        return np.maximum.reduceat(self.slice_labels, self.offsets[:-1]) if self.num_slices else np.zeros(0)

    def exam_max(self, per_slice: np.ndarray) -> np.ndarray:
        """(E,) the maximum of a per-slice score over each exam's slices."""
        return np.maximum.reduceat(np.asarray(per_slice, dtype=np.float64), self.offsets[:-1])


# ------------------------------------------------------------------------------------------------ one exam


def write_exam_file(path: Path, exam: dict[str, Any], *, digest: str, keep_masks: bool) -> None:
    """One preprocessed exam (``preprocess_exam``'s ``slices`` / ``trivial`` / ``masks`` plus ``slice_labels``,
    ``exam_labels``, ``study_id``) -> its safetensors file, atomically; ``digest``: the settings digest."""
    slices = np.ascontiguousarray(exam["slices"], dtype=np.float16)
    s = len(slices)
    if s < 1:  # preprocess_exam refuses empty volumes; a file of 0 slices would read as corrupt
        raise ValueError(f"exam {exam['study_id']}: no slice")
    tensors = {
        "slices": torch.from_numpy(slices),
        "slice_labels": torch.from_numpy(np.ascontiguousarray(exam["slice_labels"], dtype=np.uint8)),
        "exam_labels": torch.from_numpy(np.ascontiguousarray(exam["exam_labels"], dtype=np.uint8)),
        "trivial": torch.from_numpy(np.ascontiguousarray(exam["trivial"], dtype=np.float64).reshape(s, -1)),
    }
    if keep_masks:
        tensors["masks"] = torch.from_numpy(np.ascontiguousarray(exam["masks"], dtype=np.uint8))
    if slices.ndim != 3 or tensors["slice_labels"].shape != (s,):
        raise ValueError(f"exam {exam['study_id']}: slices {slices.shape} and {len(tensors['slice_labels'])} slice "
                         "labels do not describe one exam of S slices")  # fmt: skip
    if keep_masks and tuple(tensors["masks"].shape) != slices.shape:
        raise ValueError(f"exam {exam['study_id']}: masks {tuple(tensors['masks'].shape)} and slices {slices.shape}")
    meta = {"study_id": str(exam["study_id"]), "digest": digest, "format": str(EXAM_FORMAT)}
    save_safetensors_atomic(path, tensors, meta)


def _shapes(path: Path) -> tuple[dict[str, str], dict[str, list[int]]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    except _READ_ERRORS as err:
        raise CorruptExamFile(f"{path}: not a readable per-exam slice file ({err})") from None


def check_exam_file(path: Path, *, digest: str, study_id: str, keep_masks: bool | None = None) -> bool:
    """True when ``path`` is this exam's file under these settings; False when it is missing or was written with
    other settings (it is then rewritten); :class:`CorruptExamFile` naming it when it is unreadable or its tensors
    do not describe one exam (with ``keep_masks`` given: also when it holds masks and should not, or the reverse).
    :func:`build_exam_split` rewrites such a file with a warning."""
    if not path.is_file():
        return False
    meta, shapes = _shapes(path)
    if meta.get("digest") != digest or meta.get("format") != str(EXAM_FORMAT):
        log.info("%s: written with other settings, rewriting it", path)
        return False
    problem = None
    if meta.get("study_id") != str(study_id):
        problem = f"holds study {meta.get('study_id')!r}, expected {study_id!r}"
    elif missing := [k for k in EXAM_KEYS if k not in shapes]:
        problem = f"lacks tensors {missing}"
    elif keep_masks is not None and keep_masks != ("masks" in shapes):
        problem = "holds emboli masks, which this split does not keep" if not keep_masks else "lacks the masks"
    else:
        s = shapes["slices"][0] if len(shapes["slices"]) == 3 else -1
        if s < 1 or shapes["slice_labels"] != [s] or shapes["trivial"][:1] != [s] or len(shapes["exam_labels"]) != 1:
            problem = f"tensor shapes {shapes} do not describe one exam of S slices"
        elif "masks" in shapes and shapes["masks"] != shapes["slices"]:
            problem = f"masks {shapes['masks']} and slices {shapes['slices']} differ in shape"
    if problem:
        raise CorruptExamFile(f"{path}: {problem}")
    return True


def check_file_names(study_ids: Sequence[str], *, split: str) -> None:
    """ValueError naming both study ids when two of a split's exams would share a file (:func:`exam_file_name`
    maps them to the same name, or a study is listed twice)."""
    owner: dict[str, str] = {}
    for sid in map(str, study_ids):
        name = exam_file_name(sid)
        if name in owner:
            what = "is listed twice" if owner[name] == sid else f"and study {sid!r} both map to the file name {name!r}"
            raise ValueError(f"split {split!r}: study {owner[name]!r} {what}; the split's exams need distinct files")
        owner[name] = sid


# ------------------------------------------------------------------------------------------------ one split


class ExamJob:
    """One exam to preprocess: its study id (known before loading, it names the file) and ``load() -> dict``
    returning the preprocessed exam (``write_exam_file``'s input)."""

    def __init__(self, study_id: str, load: Callable[[], dict[str, Any]]) -> None:
        self.study_id, self.load = str(study_id), load


def exam_index(directory: Path, *, digest: str) -> dict[str, Any] | None:
    """The split's ``index.json`` when it records ``digest`` and every exam file it lists is present, else None."""
    path = Path(directory) / EXAM_INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("%s: unreadable (%s), taken as missing", path, err)
        return None
    if index.get("digest") != digest or index.get("format") != EXAM_FORMAT:
        return None
    if not all((path.parent / e["file"]).is_file() for e in index.get("exams", [])):
        return None
    return index


def write_exam_index(directory: Path, *, split: str, study_ids: Sequence[str], digest: str) -> dict[str, Any]:
    """``directory / index.json`` from the exam files themselves (their labels and slice counts), in split order.

    Every exam file must hold slices of the same H x W and the same tensors (``masks`` in all or none); the first
    that differs from the split's first exam raises :class:`CorruptExamFile` naming both."""
    check_file_names(study_ids, split=split)
    exams: list[dict[str, Any]] = []
    first: tuple[Path, list[int], bool] | None = None
    for sid in study_ids:
        path = directory / exam_file_name(sid)
        try:
            with safe_open(str(path), framework="pt") as f:
                labels = f.get_tensor("slice_labels").numpy()
                entry = {"study_id": str(sid), "file": path.name, "slices": len(labels),
                         "exam_labels": f.get_tensor("exam_labels").tolist(),
                         "slice_labels": "".join("1" if v else "0" for v in labels.tolist())}  # fmt: skip
                shape = list(f.get_slice("slices").get_shape()[1:])
                masks = "masks" in f.keys()  # noqa: SIM118
        except _READ_ERRORS as err:
            raise CorruptExamFile(f"{path}: not a readable per-exam slice file ({err})") from None
        if first is None:
            first = (path, shape, masks)
        elif (shape, masks) != first[1:]:
            raise CorruptExamFile(f"{path}: slices {'x'.join(map(str, shape))}, masks {masks}, unlike the split's "
                                  f"first exam {first[0].name} (slices {'x'.join(map(str, first[1]))}, masks "
                                  f"{first[2]}); every exam of a split needs the same H x W and tensors")  # fmt: skip
        exams.append(entry)
    shape, masks = (first[1], first[2]) if first is not None else (None, False)
    index = {"split": split, "format": EXAM_FORMAT, "digest": digest, "shape": shape, "masks": masks, "exams": exams}
    write_json(directory / EXAM_INDEX, index)
    return index


def build_exam_split(
    directory: Path,
    jobs: Sequence[ExamJob],
    *,
    split: str,
    digest: str,
    keep_masks: bool,
    rank: int = 0,
    world_size: int = 1,
) -> int:
    """Preprocess and write the exams of one split that are not on disk yet; returns how many this rank wrote.

    Two study ids sharing a file name raise ValueError before anything is written (:func:`check_file_names`).
    Every rank removes the temporary files killed writes of its exams left (:func:`remove_stale_temps`), then checks
    and writes the exams dealt to it (:func:`dealt`): an exam file of these settings is kept, a missing one or one of
    other settings written, an unreadable or inconsistent one (:func:`check_exam_file`) logged as a warning naming it
    and rewritten. Rank 0 then (re)writes ``index.json`` when an exam was written or the index is missing
    (:func:`after_shards`)."""
    directory = Path(directory)
    check_file_names([j.study_id for j in jobs], split=split)
    mine = dealt(len(jobs), rank=rank, world_size=world_size)
    for tmp in remove_stale_temps(directory, {exam_file_name(jobs[e].study_id) for e in mine}):
        log.warning("%s: removed a temporary file left by a killed write", tmp)
    written = 0
    for e in mine:
        job = jobs[e]
        path = directory / exam_file_name(job.study_id)
        try:
            if check_exam_file(path, digest=digest, study_id=job.study_id, keep_masks=keep_masks):
                continue
        except CorruptExamFile as err:
            log.warning("%s; rewriting it", err)
        exam = job.load()
        if str(exam["study_id"]) != job.study_id:
            raise ValueError(f"exam job {job.study_id!r} loaded study {exam['study_id']!r}")
        write_exam_file(path, exam, digest=digest, keep_masks=keep_masks)
        written += 1
    total = -distributed.all_reduce_min_int(-written) if world_size > 1 else written  # the most any rank wrote

    def index() -> None:
        if total or exam_index(directory, digest=digest) is None:
            write_exam_index(directory, split=split, study_ids=[j.study_id for j in jobs], digest=digest)

    after_shards(index, rank=rank, world_size=world_size)
    return written


# -------------------------------------------------------------------------------------------- the lazy store


class ExamStore(ExamOffsets):
    """The exams of one split read lazily from their per-exam files: the interface of
    :class:`~thrifty.methods.pe_cad.data.ExamSet` (``stacks``, labels, counts, ``exam_max`` ...) without holding the
    slices. Labels, slice counts and study ids come from ``index.json``; slices are read on demand from at most
    ``open_exams`` exam files kept open (memory-mapped by safetensors, least recently used closed first).

    Attributes:
        offsets: int64 (E + 1,); exam e holds global slices ``offsets[e] : offsets[e + 1]``.
        slice_labels: uint8 (N,); exam_labels: uint8 (E, 9); study_ids: str (E,).
        files: the exam files in split order.
    """

    def __init__(self, directory: Path, index: dict[str, Any], *, open_exams: int = 16) -> None:
        if open_exams < 1:
            raise ValueError(f"open_exams must be >= 1, got {open_exams}")
        self.directory = Path(directory)
        self.digest = str(index["digest"])
        self.image_shape = tuple(int(v) for v in index["shape"] or (0, 0))
        self.has_masks = bool(index.get("masks"))
        exams = index["exams"]
        self.files = [self.directory / e["file"] for e in exams]
        self.study_ids = np.asarray([e["study_id"] for e in exams]).astype(str)
        counts = [int(e["slices"]) for e in exams]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.slice_labels = np.concatenate(
            [np.frombuffer(e["slice_labels"].encode(), dtype=np.uint8) - ord("0") for e in exams] or [np.zeros(0)]
        ).astype(np.uint8)
        self.exam_labels = np.asarray([e["exam_labels"] for e in exams], dtype=np.uint8).reshape(len(exams), -1)
        self.open_exams = open_exams
        self._open: OrderedDict[int, Any] = OrderedDict()
        self._trivial: np.ndarray | None = None

    @classmethod
    def open(cls, directory: Path, *, digest: str, open_exams: int = 16) -> ExamStore:
        """The store of a built split; FileNotFoundError when its index is missing, stale or incomplete."""
        index = exam_index(directory, digest=digest)
        if index is None:
            raise FileNotFoundError(f"{directory}: no complete per-exam split of these settings (index.json and "
                                    "every exam file)")  # fmt: skip
        return cls(directory, index, open_exams=open_exams)

    # --- what ExamSet offers besides ExamOffsets -------------------------------------------------------------

    @property
    def trivial(self) -> np.ndarray:
        """float64 (N, G) the defect-fraction scores of every slice, read from every exam file on first use (the
        baseline scores validation and test)."""
        if self._trivial is None:
            parts = [self._tensor(e, "trivial").numpy() for e in range(self.num_exams)]
            self._trivial = np.concatenate(parts).astype(np.float64) if parts else np.zeros((0, 0))
        return self._trivial

    def stacks(self, idx: IndexLike, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The 3-slice stacks of slices ``idx``: (n, 3, H, W) in ``dtype`` (read as float16, as ExamSet holds them)."""
        rows = as_rows(idx, self.num_slices)
        nb = stack_neighbours(rows, self.offsets)
        return self._gather(nb.reshape(-1), "slices").reshape(len(rows), 3, *self.image_shape).to(dtype)

    def slice_images(self, idx: IndexLike) -> torch.Tensor:
        """The slices ``idx`` themselves: float16 (n, H, W)."""
        return self._gather(as_rows(idx, self.num_slices), "slices")

    def slice_masks(self, idx: IndexLike) -> np.ndarray | None:
        """The emboli masks of slices ``idx`` (uint8 (n, H, W)), or None when the split keeps none."""
        return self._gather(as_rows(idx, self.num_slices), "masks").numpy() if self.has_masks else None

    # --- reading -----------------------------------------------------------------------------------------

    def _handle(self, e: int) -> Any:
        """Exam ``e``'s open file (checked on opening), at most ``open_exams`` open at once."""
        if e in self._open:
            self._open.move_to_end(e)
            return self._open[e]
        self._make_room(e)
        path = self.files[e]
        try:
            handle = safe_open(str(path), framework="pt")
            meta = handle.metadata() or {}
            shape = handle.get_slice("slices").get_shape()
        except _READ_ERRORS as err:
            raise CorruptExamFile(f"{path}: not a readable per-exam slice file ({err}); prepare the data again "
                                  "(the build rewrites it)") from None  # fmt: skip
        count = int(self.offsets[e + 1] - self.offsets[e])
        if meta.get("digest") != self.digest or meta.get("study_id") != self.study_ids[e] or shape[0] != count:
            raise CorruptExamFile(f"{path}: does not match {self.directory / EXAM_INDEX} (study, settings digest or "
                                  f"{count} slices); delete it and prepare the data again")  # fmt: skip
        self._open[e] = handle
        return handle

    def _make_room(self, e: int) -> None:
        """Close the least recently used files so that opening exam ``e`` keeps at most ``open_exams`` open."""
        while e not in self._open and len(self._open) >= self.open_exams:
            self._open.popitem(last=False)

    def _tensor(self, e: int, name: str) -> torch.Tensor:
        return self._handle(e).get_tensor(name)

    def _gather(self, rows: np.ndarray, name: str) -> torch.Tensor:
        """Rows ``rows`` (global slice indices, any order, repeats allowed) of tensor ``name`` of the exam files:
        each exam's needed rows are read as runs of consecutive slices."""
        exam = np.searchsorted(self.offsets, rows, side="right") - 1
        out: torch.Tensor | None = None
        for e in np.unique(exam).tolist():
            where = np.flatnonzero(exam == e)
            local = rows[where] - self.offsets[e]
            wanted = np.unique(local)
            tensor = self._handle(e).get_slice(name)
            block = torch.cat([tensor[a:b] for a, b in _runs(wanted)])
            del tensor  # holds the file: drop it before the next exam's is opened
            part = block[torch.from_numpy(np.searchsorted(wanted, local))]
            if out is None:
                out = part.new_empty((len(rows), *part.shape[1:]))
            out[torch.from_numpy(where)] = part
        if out is None:
            dtype = torch.uint8 if name == "masks" else torch.float16
            return torch.zeros((0, *self.image_shape), dtype=dtype)
        return out

    def close(self) -> None:
        """Close every open exam file."""
        self._open.clear()


class StackView:
    """The (N, 3, H, W) stacks of an exam set as an array-like that gathers on indexing: what pretraining draws its
    batches from, without stacking every training slice at once."""

    ndim = 4

    def __init__(self, exams: Any, dtype: torch.dtype = torch.float16) -> None:
        self.exams, self.dtype = exams, dtype

    @property
    def shape(self) -> tuple[int, int, int, int]:
        h, w = self.exams.image_shape
        return (self.exams.num_slices, 3, h, w)

    def __len__(self) -> int:
        return self.exams.num_slices

    def __getitem__(self, idx: IndexLike) -> torch.Tensor:
        return self.exams.stacks(idx, dtype=self.dtype)


__all__ = [
    "EXAM_FORMAT",
    "EXAM_INDEX",
    "EXAM_KEYS",
    "CorruptExamFile",
    "ExamJob",
    "ExamOffsets",
    "ExamStore",
    "StackView",
    "after_shards",
    "as_rows",
    "build_exam_split",
    "check_exam_file",
    "check_file_names",
    "dealt",
    "exam_file_name",
    "exam_index",
    "remove_stale_temps",
    "safetensors_metadata",
    "save_safetensors_atomic",
    "stack_neighbours",
    "temp_path",
    "write_exam_file",
    "write_exam_index",
]
