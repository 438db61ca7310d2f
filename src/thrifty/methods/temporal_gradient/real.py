"""Real video datasets for the temporal-gradient recipe (Xiao et al., CVPR 2022, arXiv 2111.13241): UCF-101, HMDB-51
and Kinetics read from the user's files, each clip decoded on demand.

The synthetic miniature keeps its videos decoded in memory (:class:`~thrifty.methods.temporal_gradient.data.VideoSet`);
a real dataset does not fit there, so :class:`VideoFiles` keeps only the listing and decodes, per clip, the frames the
clip needs: the sampled indices ``i`` and their modality's predecessors ``i - 1 … i - context`` (MMAction2's
``SampleFrames`` semantics, every index ``>= context``, from :func:`thrifty.data.video.sample_clip_indices`), from a
video file (PyAV) or a raw-frame folder (MMAction2's ``img_{:05d}.jpg``). Each decoded frame is centre-cropped to the
aspect ratio ``real.aspect`` and resized to ``real.short_side`` × ``round(short_side · aspect)`` (the release resizes
the short side to 256 and crops from there; UCF-101 and HMDB-51 are 4:3, so the crop only trims wider videos), so the
clips of a batch stack. The returned indices point into the compact stack of decoded frames, so the rest of the
pipeline (TG, crops, views) is the same code for both sources.

Splits: the official training list minus a stratified ``data.val_fraction`` held out for validation (the release
validates on its test list; we never do), the official test list as test. The labelled subset is the release's list
(``real.labelled_list``, "frame_dir n_frames label" or "path label") matched to training videos by name, or a
stratified ``data.labelled_fraction``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from thrifty.data import video as vio
from thrifty.methods.temporal_gradient.config import TemporalGradientConfig
from thrifty.methods.temporal_gradient.sampling import frame_indices, stratified_subset


@dataclasses.dataclass
class VideoFiles:
    """A split read from files: ``records`` (one :class:`~thrifty.data.video.VideoRecord` per video), ``labels``
    int64 (N,), and how frames are read and sized."""

    records: list[vio.VideoRecord]
    labels: np.ndarray
    short_side: int
    aspect: float
    frame_pattern: str = vio.DEFAULT_RAWFRAME_PATTERN
    _counts: dict[int, int] = dataclasses.field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray | Sequence[int]) -> VideoFiles:
        idx = np.asarray(idx, dtype=np.int64)
        return VideoFiles(
            [self.records[int(i)] for i in idx], self.labels[idx], self.short_side, self.aspect, self.frame_pattern
        )

    @property
    def frame_shape(self) -> tuple[int, int]:
        """(H, W) of every decoded frame."""
        return self.short_side, round(self.short_side * self.aspect)

    def num_frames(self, row: int) -> int:
        """Frame count of video ``row``: the listing's, else counted exactly once (decoding the whole file)."""
        if row not in self._counts:
            rec = self.records[row]
            path = Path(rec.path)
            if rec.num_frames is not None:
                count = rec.num_frames
            elif path.is_dir():
                count = vio.count_frames(path, self.frame_pattern)
            else:
                count = vio.video_info(path, exact=True).num_frames
            if count < 2:
                raise vio.VideoDataError(
                    f"{rec.path}: {count} frame(s); a clip needs at least 2 (TG reads a predecessor)"
                )
            self._counts[row] = count
        return self._counts[row]

    def clips(
        self,
        rows: np.ndarray,
        cfg: TemporalGradientConfig,
        *,
        context: int,
        rng: np.random.Generator | None,
        test_mode: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The frames clips of ``rows`` need and where the clips sit in them.

        Returns:
            video: float (n, 3, M, H, W) in [0, 1]: per video, its needed frames in time order (padded by repeating
                the last one to the batch's longest count M).
            indices: int64 (n, num_clips, clip_len): positions in ``video`` of the sampled frames; position ``p - k``
                holds raw frame ``i - k`` for ``k <= context``.
        """
        rows = np.asarray(rows, dtype=np.int64)
        counts = [self.num_frames(int(r)) for r in rows]
        raw = frame_indices(len(rows), counts, cfg, context=context, rng=rng, test_mode=test_mode)
        stacks, positions = [], []
        for r, idx in zip(rows, raw, strict=True):
            needed = np.unique(np.concatenate([(idx - k).ravel() for k in range(context + 1)]))
            rec = self.records[int(r)]
            frames = vio.decode_clip(rec.path, needed, pattern=self.frame_pattern)
            stacks.append(fit_frames(frames, self.frame_shape))
            positions.append(np.searchsorted(needed, idx))
        longest = max(len(s) for s in stacks)
        video = torch.stack([torch.cat([s, s[-1:].expand(longest - len(s), -1, -1, -1)]) for s in stacks])
        return video.permute(0, 4, 1, 2, 3).float().div_(255.0), torch.from_numpy(np.stack(positions))


def fit_frames(frames: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """uint8 frames (m, h, w, 3) centre-cropped to the aspect ratio of ``shape`` (H, W) and resized to it (bilinear,
    antialiased): uint8 (m, H, W, 3)."""
    h, w = frames.shape[1:3]
    out_h, out_w = shape
    if h * out_w > w * out_h:  # too tall: trim rows
        keep = max(1, round(w * out_h / out_w))
        top = (h - keep) // 2
        frames = frames[:, top : top + keep]
    elif h * out_w < w * out_h:  # too wide: trim columns
        keep = max(1, round(h * out_w / out_h))
        left = (w - keep) // 2
        frames = frames[:, :, left : left + keep]
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (out_h, out_w):
        x = F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _records(cfg: TemporalGradientConfig, subset: str) -> tuple[list[vio.VideoRecord], list[str]]:
    d, r = cfg.data, cfg.data.real
    if d.source == "ucf101":
        recs, classes = vio.parse_ucf101(r.split_dir, split=r.split, subset=subset, video_root=r.video_root)
    elif d.source == "hmdb51":
        recs, classes = vio.parse_hmdb51(r.split_dir, split=r.split, subset=subset, video_root=r.video_root)
    else:  # kinetics: the listing folder holds the training and the validation CSV (the latter serves as test)
        train_recs, classes = vio.parse_kinetics_csv(Path(r.split_dir) / r.kinetics_files[0], video_root=r.video_root)
        if subset == "train":
            recs = train_recs
        else:
            recs, _ = vio.parse_kinetics_csv(
                Path(r.split_dir) / r.kinetics_files[1], video_root=r.video_root, classes=classes
            )
    if r.rawframes:  # MMAction2 raw-frame folders sit where the videos would, without the extension
        recs = [dataclasses.replace(x, path=str(Path(x.path).with_suffix(""))) for x in recs]
    vio.check_exists(recs)
    return recs, classes


def _files(cfg: TemporalGradientConfig, recs: list[vio.VideoRecord]) -> VideoFiles:
    r = cfg.data.real
    labels = np.asarray([x.label for x in recs], dtype=np.int64)
    return VideoFiles(recs, labels, r.short_side, r.aspect, r.frame_pattern)


def load_real(cfg: TemporalGradientConfig) -> tuple[dict[str, VideoFiles], list[str], np.ndarray | None]:
    """The ``train`` / ``val`` / ``test`` splits of ``data.source``, the class names, and the rows of the training
    split named by ``real.labelled_list`` (None without one)."""
    train_recs, classes = _records(cfg, "train")
    test_recs, _ = _records(cfg, "test")
    train_all = _files(cfg, train_recs)
    holdout_seed = int(np.random.SeedSequence(cfg.data.real.seed, spawn_key=(1,)).generate_state(1)[0])
    held = stratified_subset(train_all.labels, cfg.data.val_fraction, seed=holdout_seed)  # its own stream
    keep = np.setdiff1d(np.arange(len(train_all)), held)
    splits = {"train": train_all.subset(keep), "val": train_all.subset(held), "test": _files(cfg, test_recs)}
    labelled = None
    if cfg.data.real.labelled_list:
        labelled = labelled_rows(splits["train"], cfg.data.real.labelled_list, num_classes=len(classes))
    return splits, classes, labelled


def labelled_rows(train: VideoFiles, listing: str, *, num_classes: int) -> np.ndarray:
    """Rows of ``train`` that the release-style ``listing`` names ("frame_dir n_frames label" or "path label"),
    matched by name (the listed path without extension); a listed video absent from ``train`` (e.g. held out for
    validation) or a label that disagrees is one error naming it."""
    src = Path(listing)
    first = next((ln for ln in src.read_text().splitlines() if ln.strip()), "") if src.is_file() else ""
    parse = vio.parse_rawframe_list if len(first.split()) == 3 else vio.parse_video_list
    listed = parse(src, root="", num_classes=num_classes)
    where = {rec.name: i for i, rec in enumerate(train.records)}  # names: listed paths without extension
    rows = []
    for rec in listed:
        key = rec.name
        if key not in where:
            raise vio.VideoDataError(
                f"{src}: {key!r} is not a training video of this split (missing, or held out for validation: "
                "lower data.val_fraction or pass a list of training videos only)"
            )
        row = where[key]
        if int(train.labels[row]) != rec.label:
            raise vio.VideoDataError(
                f"{src}: {key!r} has label {rec.label}, the split's listing says {int(train.labels[row])}"
            )
        rows.append(row)
    return np.unique(np.asarray(rows, dtype=np.int64))
