"""Run under ``torchrun --nproc_per_node=2``: the per-exam store (``data.store=exams``) preprocessed sharded over the
ranks, and stage 2 on per-exam feature files reading only each rank's exams. Usage: ``exam_store_check.py OUT DATA``.

Each rank writes ``OUT/rank<r>.json``: the study ids it preprocessed (per split) and the feature files stage 2 read
(training and validation), then prints STORE-OK. ``test_exam_store.py`` compares the files with one process's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from thrifty.core import distributed
from thrifty.core.registry import load_config
from thrifty.core.run import MetricsLog
from thrifty.core.splits import AccessLog
from thrifty.methods.pe_cad import data as pe_data
from thrifty.methods.pe_cad import exam_store
from thrifty.methods.pe_cad import train as recipe

FEATURE_DIM = 4


def write_fake_features(directory: Path, exams: pe_data.Exams, split: str) -> None:
    """Deterministic stand-in stage-1 features, one file per exam (rank 0)."""
    gen = torch.Generator().manual_seed(7)
    for e, study in enumerate(exams.study_ids.tolist()):
        a, b = int(exams.offsets[e]), int(exams.offsets[e + 1])
        pe_data.save_exam_features(directory / pe_data.exam_feature_name(study),
                                   features=torch.randn(b - a, FEATURE_DIM, generator=gen), probs=torch.rand(b - a),
                                   slice_labels=exams.slice_labels[a:b], exam_labels=exams.exam_labels[e],
                                   study_id=study, digest="fake")  # fmt: skip
    pe_data.write_feature_index(directory, split=split, study_ids=exams.study_ids.tolist(), settings={"fake": 1})


def main() -> int:
    out, data_dir = Path(sys.argv[1]), Path(sys.argv[2])
    info = distributed.init(torch.device("cpu"))
    written: dict[str, list[str]] = {}
    real_write = exam_store.write_exam_file

    def write_spy(path: Path, exam: dict, **kwargs) -> None:
        written.setdefault(path.parent.name, []).append(str(exam["study_id"]))
        real_write(path, exam, **kwargs)

    exam_store.write_exam_file = write_spy
    args = [f"out_dir={out}", f"data_dir={data_dir}", "progress=false", "num_threads=1", "data.store=exams",
            "final_test=false", "stage2.epochs=2"]  # fmt: skip
    cfg = load_config("pe_cad", "smoke", args)[1]
    data = pe_data.prepare_data(cfg, data_dir, out, AccessLog(), info=info)

    fdir = out / "features"
    if info.rank == 0:
        write_fake_features(fdir / "train", data.train, "train")
        write_fake_features(fdir / "val", data.val.get("features", "check"), "val")
    distributed.barrier()
    reads: list[str] = []
    real_read = pe_data.read_exam_features

    def read_spy(path: Path) -> dict[str, torch.Tensor]:
        reads.append(f"{path.parent.name}/{path.name}")
        return real_read(path)

    pe_data.read_exam_features = read_spy
    fs = {s: pe_data.open_feature_split(fdir / s) for s in ("train", "val")}
    feats = {"train": fs["train"], "val": pe_data.GuardedFeatures("val", fs["val"], AccessLog()),
             "batch/train": recipe.collate(fs["train"], cfg), "batch/val": recipe.collate(fs["val"], cfg)}  # fmt: skip
    metrics = MetricsLog(out / "metrics.jsonl", enabled=False)
    result = recipe.stage2_unit("cc", 0, "cnn-random", cfg, feats, out / "run", metrics, info.device, info=info)
    record = {"written": written, "reads": reads, "best_epoch": result["best_epoch"]}
    (out / f"rank{info.rank}.json").write_text(json.dumps(record))
    distributed.shutdown()
    print("STORE-OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
