"""Real-format GLUE and SQuAD readers and metrics for evaluating BERT-style students at full scale.

Used by the AutoDistill recipe. Nothing is downloaded: every reader takes files that are already on disk, in the
layout the public distributions use.

GLUE (``<task_dir>/dev.tsv``; MNLI ``dev_matched.tsv`` / ``dev_mismatched.tsv``):

* :data:`GLUE_TASKS` describes the nine tasks: which columns hold the texts and the label, the class names in
  index order (``None`` for the STS-B regression) and the task's metric. CoLA has no header row, so its
  columns are given by index (source, label, original label, sentence).
* :func:`read_glue_tsv` reads one split into a :class:`GlueSplit`. GLUE files contain quote characters that are
  not quoting (e.g. ``"`` at the start of an MRPC sentence), so rows are split on tabs only
  (``csv.QUOTE_NONE``). A few MRPC/QQP rows have too few fields; they raise unless ``skip_bad=True``, in which
  case they are skipped and counted in :attr:`GlueSplit.skipped`. A leading byte-order mark (the MRPC files
  carry one) is ignored.
* Metrics are pure functions of prediction and gold sequences: :func:`accuracy`, :func:`binary_f1`,
  :func:`matthews_corrcoef`, :func:`pearson_spearman`, and :func:`glue_metric`, which picks the task's metric.
  They return fractions in ``[0, 1]`` (correlations in ``[-1, 1]``), not percentages.

SQuAD v1.1 / v2.0 JSON:

* :func:`read_squad` reads ``data → paragraphs → {context, qas}`` into :class:`SquadExample` records and checks
  that every answer's ``answer_start`` points at its text in the context.
* :func:`normalize_answer`, :func:`squad_em_f1` and :func:`squad_scores` follow the official evaluation scripts
  (lower case, no punctuation, no articles, collapsed whitespace; token-level F1; maximum over gold answers;
  an unanswerable question scores 1 only for an empty prediction). :func:`squad_scores` reports percentages.

Every data problem raises :class:`EvalDataError`, whose message names the file (and the line or JSON location
where that applies) and says what was expected.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import re
import string
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "GLUE_METRICS",
    "GLUE_TASKS",
    "EvalDataError",
    "GlueSplit",
    "GlueTask",
    "SquadExample",
    "accuracy",
    "binary_f1",
    "glue_dev_file",
    "glue_metric",
    "glue_task",
    "matthews_corrcoef",
    "normalize_answer",
    "pearson_spearman",
    "read_glue_tsv",
    "read_squad",
    "squad_em_f1",
    "squad_scores",
]

GLUE_METRICS = ("mcc", "f1_acc", "pearson_spearman", "accuracy")


class EvalDataError(ValueError):
    """An evaluation file is missing or malformed; the message names it (and the line or location) and what was
    expected."""


# ---------------------------------------------------------------------------------------------------------------
# GLUE tasks
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """How to read one GLUE task's TSV files and score it.

    With ``header=True`` the ``text_a``/``text_b``/``label`` fields name columns of the header row. With
    ``header=False`` (CoLA) they are descriptive names only and the ``*_index`` fields give the column positions.
    """

    name: str
    text_a: str
    text_b: str | None
    label: str
    labels: tuple[str, ...] | None  # class names in index order; None = regression
    metric: str
    header: bool = True
    text_a_index: int | None = None
    text_b_index: int | None = None
    label_index: int | None = None

    def __post_init__(self) -> None:
        if self.metric not in GLUE_METRICS:
            raise ValueError(f"GlueTask {self.name!r}: metric must be one of {GLUE_METRICS}, got {self.metric!r}")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"GlueTask {self.name!r}: duplicate class names in {self.labels!r}")
        if (self.labels is None) != (self.metric == "pearson_spearman"):
            raise ValueError(f"GlueTask {self.name!r}: labels=None (regression) goes with metric 'pearson_spearman'")
        if not self.header:
            if self.text_a_index is None or self.label_index is None:
                raise ValueError(f"GlueTask {self.name!r}: a headerless task needs text_a_index and label_index")
            if (self.text_b is None) != (self.text_b_index is None):
                raise ValueError(f"GlueTask {self.name!r}: text_b and text_b_index must both be set or both None")

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        """Number of classes (1 for regression)."""
        return 1 if self.labels is None else len(self.labels)


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, GlueTask] = {
    "CoLA": GlueTask(
        "CoLA",
        text_a="sentence",
        text_b=None,
        label="label",
        labels=_BINARY,
        metric="mcc",
        header=False,
        text_a_index=3,
        label_index=1,
    ),
    "SST-2": GlueTask("SST-2", text_a="sentence", text_b=None, label="label", labels=_BINARY, metric="accuracy"),
    "MRPC": GlueTask("MRPC", text_a="#1 String", text_b="#2 String", label="Quality", labels=_BINARY, metric="f1_acc"),
    "QQP": GlueTask(
        "QQP", text_a="question1", text_b="question2", label="is_duplicate", labels=_BINARY, metric="f1_acc"
    ),
    "STS-B": GlueTask(
        "STS-B", text_a="sentence1", text_b="sentence2", label="score", labels=None, metric="pearson_spearman"
    ),
    "MNLI": GlueTask(
        "MNLI",
        text_a="sentence1",
        text_b="sentence2",
        label="gold_label",
        labels=("contradiction", "entailment", "neutral"),
        metric="accuracy",
    ),
    "QNLI": GlueTask("QNLI", text_a="question", text_b="sentence", label="label", labels=_NLI2, metric="accuracy"),
    "RTE": GlueTask("RTE", text_a="sentence1", text_b="sentence2", label="label", labels=_NLI2, metric="accuracy"),
    "WNLI": GlueTask("WNLI", text_a="sentence1", text_b="sentence2", label="label", labels=_BINARY, metric="accuracy"),
}


def _task_key(name: str) -> str:
    return re.sub(r"[-_\s]", "", name).lower()


_TASKS_BY_KEY = {_task_key(name): task for name, task in GLUE_TASKS.items()}


def glue_task(task: str | GlueTask) -> GlueTask:
    """Look up a task by name, ignoring case, ``-`` and ``_`` (``"sst2"``, ``"STS-B"``, ``"sts_b"``)."""
    if isinstance(task, GlueTask):
        return task
    try:
        return _TASKS_BY_KEY[_task_key(task)]
    except KeyError:
        raise ValueError(f"unknown GLUE task {task!r}; known: {', '.join(GLUE_TASKS)}") from None


def glue_dev_file(task_dir: str | Path, task: str | GlueTask, *, mismatched: bool = False) -> Path:
    """The dev split's path inside a GLUE task folder: ``dev.tsv``, or for MNLI ``dev_matched.tsv`` (or
    ``dev_mismatched.tsv`` with ``mismatched=True``). The file is not opened here."""
    t = glue_task(task)
    if t.name == "MNLI":
        return Path(task_dir) / ("dev_mismatched.tsv" if mismatched else "dev_matched.tsv")
    if mismatched:
        raise ValueError(f"mismatched=True only applies to MNLI, not {t.name}")
    return Path(task_dir) / "dev.tsv"


@dataclasses.dataclass
class GlueSplit:
    """One split of a GLUE task: texts, labels (class indices, or floats for STS-B) and skipped bad rows."""

    texts_a: list[str]
    texts_b: list[str] | None
    labels: list[int] | list[float]
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.labels)


def read_glue_tsv(path: str | Path, task: str | GlueTask, *, skip_bad: bool = False) -> GlueSplit:
    """Read one GLUE TSV file.

    Rows are split on tabs with quoting disabled. Blank lines are ignored. A row with too few fields for the
    task's columns raises :class:`EvalDataError` (file and line) unless ``skip_bad`` is set, in which case it is
    skipped and counted. Label values are mapped to class indices in the order of ``task.labels``; an unknown
    value always raises, naming file, line and the allowed values. STS-B scores are parsed as finite floats.
    """
    t = glue_task(task)
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: GLUE {t.name} file not found (expected a tab-separated file)")
    texts_a: list[str] = []
    texts_b: list[str] | None = [] if t.text_b is not None else None
    labels: list[Any] = []
    skipped = 0
    class_index = {name: i for i, name in enumerate(t.labels)} if t.labels is not None else None
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            if t.header:
                header = next(reader, None)
                if header is None or not any(h.strip() for h in header):
                    raise EvalDataError(f"{path}: empty file, expected a GLUE {t.name} header row")
                header = [h.strip() for h in header]
                idx_a = _column(path, header, t.text_a, t.name)
                idx_b = _column(path, header, t.text_b, t.name) if t.text_b is not None else None
                idx_label = _column(path, header, t.label, t.name)
            else:
                idx_a, idx_b, idx_label = t.text_a_index, t.text_b_index, t.label_index
            assert idx_a is not None and idx_label is not None
            needed = max(i for i in (idx_a, idx_b, idx_label) if i is not None) + 1
            for row in reader:
                line = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) < needed:
                    if skip_bad:
                        skipped += 1
                        continue
                    raise EvalDataError(
                        f"{path}, line {line}: expected at least {needed} tab-separated fields for GLUE {t.name}, "
                        f"found {len(row)} (pass skip_bad=True to skip such rows)"
                    )
                raw = row[idx_label].strip()
                if class_index is None:
                    labels.append(_parse_score(path, line, raw, t))
                else:
                    if raw not in class_index:
                        allowed = ", ".join(repr(x) for x in class_index)
                        raise EvalDataError(
                            f"{path}, line {line}: unknown {t.name} label {raw!r} in column {t.label!r}; "
                            f"expected one of {allowed}"
                        )
                    labels.append(class_index[raw])
                texts_a.append(row[idx_a])
                if texts_b is not None:
                    assert idx_b is not None
                    texts_b.append(row[idx_b])
    except UnicodeDecodeError as exc:
        raise EvalDataError(f"{path}: not valid UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except csv.Error as exc:
        raise EvalDataError(f"{path}: cannot parse as tab-separated text: {exc}") from exc
    if not labels:
        what = f" ({skipped} malformed rows skipped)" if skipped else ""
        raise EvalDataError(f"{path}: no data rows{what}; expected at least one GLUE {t.name} example")
    return GlueSplit(texts_a=texts_a, texts_b=texts_b, labels=labels, skipped=skipped)


def _column(path: Path, header: list[str], name: str, task_name: str) -> int:
    try:
        return header.index(name)
    except ValueError:
        raise EvalDataError(
            f"{path}: missing column {name!r} required for GLUE {task_name}; header found: {header!r}"
        ) from None


def _parse_score(path: Path, line: int, raw: str, task: GlueTask) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise EvalDataError(
            f"{path}, line {line}: {task.name} score {raw!r} in column {task.label!r} is not a finite number"
        )
    return value


# ---------------------------------------------------------------------------------------------------------------
# GLUE metrics
# ---------------------------------------------------------------------------------------------------------------


def _pair(pred: Sequence[Any], gold: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    p, g = np.asarray(pred), np.asarray(gold)
    if p.ndim != 1 or g.ndim != 1:
        raise ValueError(f"predictions and gold must be 1-D, got shapes {p.shape} and {g.shape}")
    if len(p) != len(g):
        raise ValueError(f"{len(p)} predictions for {len(g)} gold labels")
    if len(p) == 0:
        raise ValueError("no predictions to score")
    return p, g


def accuracy(pred: Sequence[Any], gold: Sequence[Any]) -> float:
    """Fraction of positions where prediction equals gold."""
    p, g = _pair(pred, gold)
    return float(np.mean(p == g))


def _confusion(pred: Sequence[Any], gold: Sequence[Any], positive: Any) -> tuple[int, int, int, int]:
    p, g = _pair(pred, gold)
    pp, gp = p == positive, g == positive
    tp = int(np.sum(pp & gp))
    fp = int(np.sum(pp & ~gp))
    fn = int(np.sum(~pp & gp))
    tn = int(np.sum(~pp & ~gp))
    return tp, fp, fn, tn


def binary_f1(pred: Sequence[Any], gold: Sequence[Any], positive: Any = 1) -> float:
    """F1 of the ``positive`` class: 2·TP / (2·TP + FP + FN); 0.0 when there are no true positives."""
    tp, fp, fn, _ = _confusion(pred, gold, positive)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_corrcoef(pred: Sequence[Any], gold: Sequence[Any], positive: Any = 1) -> float:
    """Binary Matthews correlation, (TP·TN − FP·FN) / √((TP+FP)(TP+FN)(TN+FP)(TN+FN)).

    Anything not equal to ``positive`` counts as negative. Returns 0.0 when the denominator is zero (a constant
    prediction or a constant gold), as scikit-learn does.
    """
    tp, fp, fn, tn = _confusion(pred, gold, positive)
    denom = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    if denom == 0:
        return 0.0
    return float((tp * tn - fp * fn) / math.sqrt(denom))


def pearson_spearman(pred: Sequence[float], gold: Sequence[float]) -> tuple[float, float]:
    """Pearson and Spearman correlations (``scipy.stats``). NaN when either side is constant (undefined)."""
    from scipy import stats

    p, g = _pair(pred, gold)
    if len(p) < 2:
        raise ValueError("correlation needs at least two pairs")
    p, g = p.astype(np.float64), g.astype(np.float64)
    if np.all(p == p[0]) or np.all(g == g[0]):
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pearson = float(stats.pearsonr(p, g)[0])
        spearman = float(stats.spearmanr(p, g)[0])
    return pearson, spearman


def glue_metric(task: str | GlueTask, pred: Sequence[Any], gold: Sequence[Any]) -> dict[str, float]:
    """The task's metric(s): ``{"mcc"}``, ``{"f1", "accuracy"}``, ``{"pearson", "spearman"}`` or ``{"accuracy"}``.

    Classification predictions and gold are class indices (as :func:`read_glue_tsv` returns); for the F1 tasks
    (MRPC, QQP) the positive class is index 1.
    """
    t = glue_task(task)
    if t.metric == "mcc":
        return {"mcc": matthews_corrcoef(pred, gold)}
    if t.metric == "f1_acc":
        return {"f1": binary_f1(pred, gold, positive=1), "accuracy": accuracy(pred, gold)}
    if t.metric == "pearson_spearman":
        pearson, spearman = pearson_spearman(pred, gold)
        return {"pearson": pearson, "spearman": spearman}
    return {"accuracy": accuracy(pred, gold)}


# ---------------------------------------------------------------------------------------------------------------
# SQuAD
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SquadExample:
    """One SQuAD question. ``answers`` is empty exactly when ``is_impossible`` (v2.0 unanswerable)."""

    id: str
    question: str
    context: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]
    is_impossible: bool = False


def read_squad(path: str | Path) -> list[SquadExample]:
    """Read a SQuAD v1.1 or v2.0 JSON file into examples, in file order.

    Structure errors name the file and the JSON location (``data[0].paragraphs[2].qas[1]``). Each answer must
    sit at its ``answer_start`` in the context; an answerable question must have at least one answer, an
    unanswerable one (``is_impossible: true``) none (v2.0 ``plausible_answers`` are ignored); question ids must be
    unique. A missing ``is_impossible`` means False.
    """
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: SQuAD file not found (expected a JSON file)")
    try:
        with path.open(encoding="utf-8-sig") as fh:
            root = json.load(fh)
    except json.JSONDecodeError as exc:
        raise EvalDataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    except UnicodeDecodeError as exc:
        raise EvalDataError(f"{path}: not valid UTF-8 text ({exc.reason} at byte {exc.start})") from exc

    data = _get(path, root, "data", list, "")
    examples: list[SquadExample] = []
    seen: dict[str, str] = {}
    for ai, article in enumerate(data):
        aloc = f"data[{ai}]"
        _expect(path, article, dict, aloc)
        paragraphs = _get(path, article, "paragraphs", list, aloc)
        for pi, para in enumerate(paragraphs):
            ploc = f"{aloc}.paragraphs[{pi}]"
            _expect(path, para, dict, ploc)
            context = _get(path, para, "context", str, ploc)
            qas = _get(path, para, "qas", list, ploc)
            for qi, qa in enumerate(qas):
                qloc = f"{ploc}.qas[{qi}]"
                _expect(path, qa, dict, qloc)
                examples.append(_read_qa(path, qa, context, qloc, seen))
    if not examples:
        raise EvalDataError(f"{path}: no questions found; expected data → paragraphs → qas with at least one entry")
    return examples


def _read_qa(path: Path, qa: dict, context: str, loc: str, seen: dict[str, str]) -> SquadExample:
    qid = _get(path, qa, "id", str, loc)
    if qid in seen:
        raise EvalDataError(f"{path}: {loc}: duplicate question id {qid!r} (first at {seen[qid]})")
    seen[qid] = loc
    question = _get(path, qa, "question", str, loc)
    impossible = qa.get("is_impossible", False)
    if not isinstance(impossible, bool):
        raise EvalDataError(f"{path}: {loc}.is_impossible: expected true/false, got {impossible!r} (id {qid!r})")
    if impossible and "answers" not in qa:
        raw_answers: list = []
    else:
        raw_answers = _get(path, qa, "answers", list, loc)
    if impossible and raw_answers:
        raise EvalDataError(
            f"{path}: {loc}: question {qid!r} is marked is_impossible but has {len(raw_answers)} answers; "
            "expected an empty answers list"
        )
    if not impossible and not raw_answers:
        raise EvalDataError(
            f"{path}: {loc}: answerable question {qid!r} has no answers; expected at least one (or is_impossible: true)"
        )
    texts: list[str] = []
    starts: list[int] = []
    for ni, ans in enumerate(raw_answers):
        nloc = f"{loc}.answers[{ni}]"
        _expect(path, ans, dict, nloc)
        text = _get(path, ans, "text", str, nloc)
        start = _get(path, ans, "answer_start", int, nloc)
        if isinstance(start, bool) or start < 0:
            raise EvalDataError(f"{path}: {nloc}.answer_start: expected a non-negative integer, got {start!r}")
        found = context[start : start + len(text)]
        if found != text:
            raise EvalDataError(
                f"{path}: {nloc}: answer {text!r} of question {qid!r} is not at answer_start {start} "
                f"(the context there reads {found!r})"
            )
        texts.append(text)
        starts.append(start)
    return SquadExample(
        id=qid,
        question=question,
        context=context,
        answers=tuple(texts),
        answer_starts=tuple(starts),
        is_impossible=impossible,
    )


_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer"}


def _expect(path: Path, value: Any, kind: type, loc: str) -> None:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        where = loc or "top level"
        raise EvalDataError(f"{path}: {where}: expected {_TYPE_NAMES[kind]}, got {type(value).__name__}")


def _get(path: Path, obj: Any, key: str, kind: type, loc: str) -> Any:
    where = loc or "top level"
    if not isinstance(obj, dict):
        raise EvalDataError(f"{path}: {where}: expected an object with key {key!r}, got {type(obj).__name__}")
    if key not in obj:
        raise EvalDataError(f"{path}: {where}: missing key {key!r}")
    value = obj[key]
    _expect(path, value, kind, f"{loc}.{key}" if loc else key)
    return value


_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """The official SQuAD normalisation: lower case, drop ASCII punctuation, drop articles, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _f1(prediction_tokens: list[str], gold_tokens: list[str]) -> float:
    if not prediction_tokens or not gold_tokens:
        return float(prediction_tokens == gold_tokens)
    common = collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_em_f1(prediction: str, answers: Sequence[str]) -> tuple[float, float]:
    """Exact match and token F1 of one prediction, each the maximum over the gold answers.

    Gold answers that normalise to nothing are dropped, as in the v2.0 script; with no gold answer left (an
    unanswerable question) both scores are 1.0 if the prediction normalises to the empty string, else 0.0.
    """
    pred_norm = normalize_answer(prediction)
    golds = [g for g in (normalize_answer(a) for a in answers) if g]
    if not golds:
        score = float(pred_norm == "")
        return score, score
    pred_tokens = pred_norm.split()
    em = max(float(pred_norm == g) for g in golds)
    f1 = max(_f1(pred_tokens, g.split()) for g in golds)
    return em, f1


def squad_scores(predictions: Mapping[str, str], examples: Sequence[SquadExample]) -> dict[str, float]:
    """Average exact match and F1 (×100) over ``examples``; a missing prediction counts as the empty string.

    Returns ``exact_match``, ``f1``, ``total``, ``missing`` (examples with no prediction), ``has_answer`` and
    ``no_answer`` counts, and per-group ``has_answer_exact_match``/``_f1`` and ``no_answer_exact_match``/``_f1``
    for each group that is present. Predictions for ids not among the examples are ignored.
    """
    if not examples:
        raise ValueError("no SQuAD examples to score")
    em_sum = f1_sum = 0.0
    groups: dict[str, list[float]] = {"has_answer": [0, 0.0, 0.0], "no_answer": [0, 0.0, 0.0]}
    missing = 0
    for ex in examples:
        pred = predictions.get(ex.id)
        if pred is None:
            missing += 1
            pred = ""
        em, f1 = squad_em_f1(pred, ex.answers)
        em_sum += em
        f1_sum += f1
        g = groups["no_answer" if ex.is_impossible or not ex.answers else "has_answer"]
        g[0] += 1
        g[1] += em
        g[2] += f1
    n = len(examples)
    out: dict[str, float] = {
        "exact_match": 100.0 * em_sum / n,
        "f1": 100.0 * f1_sum / n,
        "total": n,
        "missing": missing,
    }
    for name, (count, em_g, f1_g) in groups.items():
        out[name] = int(count)
        if count:
            out[f"{name}_exact_match"] = 100.0 * em_g / count
            out[f"{name}_f1"] = 100.0 * f1_g / count
    return out
