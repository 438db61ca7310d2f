"""GLUE/SQuAD readers and metrics: header layouts, quote chars, bad rows and labels, metric values, SQuAD checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from thrifty.data.glue import (
    GLUE_TASKS,
    EvalDataError,
    GlueTask,
    SquadExample,
    accuracy,
    binary_f1,
    glue_dev_file,
    glue_metric,
    glue_task,
    matthews_corrcoef,
    normalize_answer,
    pearson_spearman,
    read_glue_tsv,
    read_squad,
    squad_em_f1,
    squad_scores,
)


def _tsv(path: Path, rows: list[list[str]], *, bom: bool = False) -> Path:
    text = "".join("\t".join(r) + "\n" for r in rows)
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# GLUE readers
# ---------------------------------------------------------------------------------------------------------------


def test_task_table_covers_glue_and_lookup_is_lenient() -> None:
    assert set(GLUE_TASKS) == {"CoLA", "SST-2", "MRPC", "QQP", "STS-B", "MNLI", "QNLI", "RTE", "WNLI"}
    assert glue_task("sst2") is GLUE_TASKS["SST-2"]
    assert glue_task("sts_b") is GLUE_TASKS["STS-B"]
    assert glue_task("mnli").labels == ("contradiction", "entailment", "neutral")
    assert GLUE_TASKS["STS-B"].is_regression and GLUE_TASKS["STS-B"].num_labels == 1
    with pytest.raises(ValueError, match="unknown GLUE task"):
        glue_task("squad")


def test_glue_dev_file(tmp_path: Path) -> None:
    assert glue_dev_file(tmp_path, "SST-2") == tmp_path / "dev.tsv"
    assert glue_dev_file(tmp_path, "MNLI") == tmp_path / "dev_matched.tsv"
    assert glue_dev_file(tmp_path, "MNLI", mismatched=True) == tmp_path / "dev_mismatched.tsv"
    with pytest.raises(ValueError, match="MNLI"):
        glue_dev_file(tmp_path, "RTE", mismatched=True)


def test_read_sst2(tmp_path: Path) -> None:
    f = _tsv(tmp_path / "dev.tsv", [["sentence", "label"], ["a gorgeous film ", "1"], ["dull", "0"], ["ok", "1"]])
    split = read_glue_tsv(f, "SST-2")
    assert split.texts_a == ["a gorgeous film ", "dull", "ok"]
    assert split.texts_b is None
    assert split.labels == [1, 0, 1]
    assert split.skipped == 0 and len(split) == 3


def test_read_mrpc_with_quote_chars_and_bom(tmp_path: Path) -> None:
    # Unbalanced and doubled quotes must come through verbatim: they are text, not CSV quoting.
    rows = [
        ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
        ["1", "1", "2", '"He said it was "fine," she recalled.', "She recalled he said it was fine."],
        ["0", "3", "4", 'The "Big" deal', 'A 12" record"'],
    ]
    split = read_glue_tsv(_tsv(tmp_path / "dev.tsv", rows, bom=True), "MRPC")
    assert split.texts_a == ['"He said it was "fine," she recalled.', 'The "Big" deal']
    assert split.texts_b == ["She recalled he said it was fine.", 'A 12" record"']
    assert split.labels == [1, 0]


def test_read_cola_headerless(tmp_path: Path) -> None:
    rows = [
        ["gj04", "1", "", "Our friends won't buy this analysis, let alone the next one we propose."],
        ["gj04", "0", "*", "They drank the pub."],
    ]
    split = read_glue_tsv(_tsv(tmp_path / "dev.tsv", rows), "CoLA")
    assert split.texts_a == [rows[0][3], rows[1][3]]
    assert split.texts_b is None
    assert split.labels == [1, 0]


def test_read_stsb_floats(tmp_path: Path) -> None:
    rows = [
        ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"],
        ["0", "main-captions", "MSRvid", "2012test", "0000", "none", "none", "A man plays.", "A man plays.", "5.000"],
        ["1", "main-captions", "MSRvid", "2012test", "0001", "none", "none", "A dog.", "A cat.", "0.750"],
    ]
    split = read_glue_tsv(_tsv(tmp_path / "dev.tsv", rows), "STS-B")
    assert split.labels == [5.0, 0.75]
    assert all(isinstance(x, float) for x in split.labels)
    assert split.texts_b == ["A man plays.", "A cat."]


def test_read_stsb_bad_score_names_line(tmp_path: Path) -> None:
    rows = [["sentence1", "sentence2", "score"], ["a", "b", "1.0"], ["c", "d", "high"]]
    f = _tsv(tmp_path / "dev.tsv", rows)
    with pytest.raises(EvalDataError, match=r"dev\.tsv, line 3.*'high'"):
        read_glue_tsv(f, "STS-B")


def test_read_mnli_labels(tmp_path: Path) -> None:
    rows = [
        ["index", "promptID", "pairID", "genre", "sentence1", "sentence2", "gold_label"],
        ["0", "1", "1e", "gov", "P one.", "H one.", "neutral"],
        ["1", "2", "2e", "gov", "P two.", "H two.", "contradiction"],
        ["2", "3", "3e", "gov", "P three.", "H three.", "entailment"],
    ]
    split = read_glue_tsv(_tsv(tmp_path / "dev_matched.tsv", rows), "MNLI")
    assert split.labels == [2, 0, 1]
    assert split.texts_a == ["P one.", "P two.", "P three."]
    assert split.texts_b == ["H one.", "H two.", "H three."]


def test_bad_label_names_file_line_and_allowed(tmp_path: Path) -> None:
    rows = [["question", "sentence", "label"], ["q1", "s1", "entailment"], ["q2", "s2", "maybe"]]
    f = _tsv(tmp_path / "qnli_dev.tsv", rows)
    with pytest.raises(EvalDataError) as info:
        read_glue_tsv(f, "QNLI")
    msg = str(info.value)
    assert "qnli_dev.tsv" in msg and "line 3" in msg and "'maybe'" in msg
    assert "'entailment'" in msg and "'not_entailment'" in msg


def test_missing_column_names_column_and_header(tmp_path: Path) -> None:
    f = _tsv(tmp_path / "dev.tsv", [["sentence1", "sentence_2", "label"], ["a", "b", "entailment"]])
    with pytest.raises(EvalDataError) as info:
        read_glue_tsv(f, "RTE")
    msg = str(info.value)
    assert "dev.tsv" in msg and "'sentence2'" in msg and "sentence_2" in msg


def test_ragged_row_raises_unless_skip_bad(tmp_path: Path) -> None:
    rows = [
        ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
        ["0", "1", "2", "How?", "Why?", "0"],
        ["1", "3", "4", "What is a broken row"],
        ["2", "5", "6", "Same?", "Same!", "1"],
        ["3", "7"],
    ]
    f = _tsv(tmp_path / "dev.tsv", rows)
    with pytest.raises(EvalDataError, match=r"dev\.tsv, line 3: expected at least 6 .* found 4"):
        read_glue_tsv(f, "QQP")
    split = read_glue_tsv(f, "QQP", skip_bad=True)
    assert split.skipped == 2
    assert split.labels == [0, 1]
    assert split.texts_a == ["How?", "Same?"]


def test_blank_lines_are_ignored(tmp_path: Path) -> None:
    f = tmp_path / "dev.tsv"
    f.write_text("sentence\tlabel\nfine\t1\n\nbad\t0\n\n", encoding="utf-8")
    assert read_glue_tsv(f, "SST-2").labels == [1, 0]


def test_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(EvalDataError, match=r"nope\.tsv.*not found"):
        read_glue_tsv(tmp_path / "nope.tsv", "SST-2")
    empty = tmp_path / "empty.tsv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(EvalDataError, match=r"empty\.tsv: empty file"):
        read_glue_tsv(empty, "SST-2")
    with pytest.raises(EvalDataError, match=r"empty\.tsv: no data rows"):
        read_glue_tsv(empty, "CoLA")
    header_only = _tsv(tmp_path / "header.tsv", [["sentence", "label"]])
    with pytest.raises(EvalDataError, match=r"header\.tsv: no data rows"):
        read_glue_tsv(header_only, "SST-2")
    all_bad = _tsv(tmp_path / "bad.tsv", [["sentence", "label"], ["only-one-field"]])
    with pytest.raises(EvalDataError, match=r"bad\.tsv: no data rows \(1 malformed"):
        read_glue_tsv(all_bad, "SST-2", skip_bad=True)


def test_custom_headerless_task_requires_indices() -> None:
    with pytest.raises(ValueError, match="headerless"):
        GlueTask("X", text_a="s", text_b=None, label="l", labels=("0", "1"), metric="accuracy", header=False)
    with pytest.raises(ValueError, match="metric"):
        GlueTask("X", text_a="s", text_b=None, label="l", labels=("0", "1"), metric="auc")


# ---------------------------------------------------------------------------------------------------------------
# GLUE metrics
# ---------------------------------------------------------------------------------------------------------------

# pred  1 1 0 0 1 0
# gold  1 0 0 1 1 0
#       TP FP TN FN TP TN  -> TP=2, FP=1, FN=1, TN=2
# MCC = (2*2 - 1*1) / sqrt(3*3*3*3) = 3/9 = 1/3;  F1 = 2*2 / (2*2 + 1 + 1) = 2/3;  accuracy = 4/6
PRED = [1, 1, 0, 0, 1, 0]
GOLD = [1, 0, 0, 1, 1, 0]


def test_classification_metrics_known_values() -> None:
    assert accuracy(PRED, GOLD) == pytest.approx(4 / 6)
    assert binary_f1(PRED, GOLD) == pytest.approx(2 / 3)
    assert matthews_corrcoef(PRED, GOLD) == pytest.approx(1 / 3)
    # Positive class 0: TP=2 (positions 3, 6), FP=1 (4), FN=1 (2) -> also 2/3.
    assert binary_f1(PRED, GOLD, positive=0) == pytest.approx(2 / 3)


def test_mcc_asymmetric_matrix_and_degenerate() -> None:
    # pred 1 1 1 1 0 / gold 1 1 1 0 0: TP=3, FP=1, FN=0, TN=1
    # MCC = (3*1 - 1*0) / sqrt((3+1)(3+0)(1+1)(1+0)) = 3/sqrt(24)
    assert matthews_corrcoef([1, 1, 1, 1, 0], [1, 1, 1, 0, 0]) == pytest.approx(3 / math.sqrt(24))
    assert matthews_corrcoef([0, 1, 1, 0], [1, 0, 0, 1]) == pytest.approx(-1.0)
    assert matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0  # constant prediction: undefined -> 0
    assert binary_f1([0, 0], [0, 0]) == 0.0  # no true positives


def test_metric_input_checks() -> None:
    with pytest.raises(ValueError, match="2 predictions for 3"):
        accuracy([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="no predictions"):
        accuracy([], [])


def test_pearson_spearman() -> None:
    p, s = pearson_spearman([1.0, 2.0, 3.0, 4.0], [3.0, 5.0, 7.0, 9.0])  # gold = 2x + 1
    assert p == pytest.approx(1.0) and s == pytest.approx(1.0)
    # Monotone but not linear: Spearman 1, Pearson < 1.
    p, s = pearson_spearman([1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 9.0, 100.0])
    assert s == pytest.approx(1.0) and p < 0.95
    p, s = pearson_spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0])
    assert p == pytest.approx(-1.0) and s == pytest.approx(-1.0)
    p, s = pearson_spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])
    assert math.isnan(p) and math.isnan(s)


def test_glue_metric_dispatch() -> None:
    assert glue_metric("CoLA", PRED, GOLD) == {"mcc": pytest.approx(1 / 3)}
    assert glue_metric("MRPC", PRED, GOLD) == {"f1": pytest.approx(2 / 3), "accuracy": pytest.approx(4 / 6)}
    assert glue_metric("SST-2", PRED, GOLD) == {"accuracy": pytest.approx(4 / 6)}
    out = glue_metric("STS-B", [0.0, 1.0, 2.0], [1.0, 3.0, 5.0])
    assert set(out) == {"pearson", "spearman"} and out["pearson"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------------
# SQuAD
# ---------------------------------------------------------------------------------------------------------------

CONTEXT = "The cat sat on the mat in Paris."


def _squad_doc() -> dict:
    return {
        "version": "v2.0",
        "data": [
            {
                "title": "Cats",
                "paragraphs": [
                    {
                        "context": CONTEXT,
                        "qas": [
                            {
                                "id": "q1",
                                "question": "Where did the cat sit?",
                                "answers": [
                                    {"text": "on the mat", "answer_start": 12},
                                    {"text": "mat", "answer_start": 19},
                                ],
                                "is_impossible": False,
                            },
                            {
                                "id": "q2",
                                "question": "What did the dog eat?",
                                "answers": [],
                                "plausible_answers": [{"text": "mat", "answer_start": 19}],
                                "is_impossible": True,
                            },
                            {"id": "q3", "question": "Which city?", "answers": [{"text": "Paris", "answer_start": 26}]},
                        ],
                    }
                ],
            }
        ],
    }


def _write_json(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def test_read_squad_v2_with_impossible(tmp_path: Path) -> None:
    examples = read_squad(_write_json(tmp_path / "dev-v2.0.json", _squad_doc()))
    assert [e.id for e in examples] == ["q1", "q2", "q3"]
    q1, q2, q3 = examples
    assert q1.answers == ("on the mat", "mat") and q1.answer_starts == (12, 19) and not q1.is_impossible
    assert q1.context == CONTEXT and q1.question == "Where did the cat sit?"
    assert q2.is_impossible and q2.answers == () and q2.answer_starts == ()
    assert not q3.is_impossible and q3.answers == ("Paris",)  # is_impossible absent -> False


def test_bad_answer_start_names_id(tmp_path: Path) -> None:
    doc = _squad_doc()
    doc["data"][0]["paragraphs"][0]["qas"][2]["answers"][0]["answer_start"] = 25
    with pytest.raises(EvalDataError) as info:
        read_squad(_write_json(tmp_path / "d.json", doc))
    msg = str(info.value)
    assert "d.json" in msg and "'q3'" in msg and "answer_start 25" in msg
    assert "data[0].paragraphs[0].qas[2].answers[0]" in msg


def test_missing_keys_name_location(tmp_path: Path) -> None:
    doc = _squad_doc()
    del doc["data"][0]["paragraphs"][0]["qas"][1]["question"]
    with pytest.raises(EvalDataError, match=r"d1\.json: data\[0\]\.paragraphs\[0\]\.qas\[1\]: missing key 'question'"):
        read_squad(_write_json(tmp_path / "d1.json", doc))
    doc = _squad_doc()
    del doc["data"][0]["paragraphs"][0]["context"]
    with pytest.raises(EvalDataError, match=r"d2\.json: data\[0\]\.paragraphs\[0\]: missing key 'context'"):
        read_squad(_write_json(tmp_path / "d2.json", doc))
    with pytest.raises(EvalDataError, match=r"d3\.json: top level: missing key 'data'"):
        read_squad(_write_json(tmp_path / "d3.json", {"version": "1.1"}))
    doc = _squad_doc()
    doc["data"][0]["paragraphs"] = {"context": "x"}
    with pytest.raises(EvalDataError, match=r"d4\.json: data\[0\]\.paragraphs: expected a list"):
        read_squad(_write_json(tmp_path / "d4.json", doc))


def test_answerable_without_answers_and_contradictions(tmp_path: Path) -> None:
    doc = _squad_doc()
    doc["data"][0]["paragraphs"][0]["qas"][2]["answers"] = []  # v1.1 style: no is_impossible
    with pytest.raises(EvalDataError, match=r"answerable question 'q3' has no answers"):
        read_squad(_write_json(tmp_path / "a.json", doc))
    doc = _squad_doc()
    doc["data"][0]["paragraphs"][0]["qas"][1]["answers"] = [{"text": "mat", "answer_start": 19}]
    with pytest.raises(EvalDataError, match=r"'q2' is marked is_impossible"):
        read_squad(_write_json(tmp_path / "b.json", doc))
    doc = _squad_doc()
    doc["data"][0]["paragraphs"][0]["qas"][2]["id"] = "q1"
    with pytest.raises(EvalDataError, match=r"duplicate question id 'q1'"):
        read_squad(_write_json(tmp_path / "c.json", doc))


def test_invalid_json_and_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "broken.json"
    f.write_text('{"data": [', encoding="utf-8")
    with pytest.raises(EvalDataError, match=r"broken\.json: invalid JSON"):
        read_squad(f)
    with pytest.raises(EvalDataError, match=r"absent\.json.*not found"):
        read_squad(tmp_path / "absent.json")
    with pytest.raises(EvalDataError, match=r"empty\.json: no questions"):
        read_squad(_write_json(tmp_path / "empty.json", {"data": []}))


def test_normalize_answer() -> None:
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # article only as a whole word
    assert normalize_answer("  U.S.A.\t") == "usa"
    assert normalize_answer("the") == ""


def test_squad_em_f1_known_values() -> None:
    # "the cat sat" -> [cat, sat]; "a cat sat on" -> [cat, sat, on]. Common 2: P = 2/2, R = 2/3,
    # F1 = 2 * 1 * (2/3) / (1 + 2/3) = (4/3) / (5/3) = 0.8; no exact match.
    assert squad_em_f1("the cat sat", ["a cat sat on"]) == (0.0, pytest.approx(0.8))
    # Max over answers: the second answer matches exactly after normalisation.
    assert squad_em_f1("the cat sat", ["a cat sat on", "Cat sat."]) == (1.0, 1.0)
    # Repeated tokens count with multiplicity: pred [cat, cat] vs gold [cat]: common 1, P = 1/2, R = 1, F1 = 2/3.
    assert squad_em_f1("cat cat", ["cat"])[1] == pytest.approx(2 / 3)
    assert squad_em_f1("dog", ["cat"]) == (0.0, 0.0)
    # Unanswerable: only an empty (after normalisation) prediction scores.
    assert squad_em_f1("", []) == (1.0, 1.0)
    assert squad_em_f1("the.", []) == (1.0, 1.0)
    assert squad_em_f1("mat", []) == (0.0, 0.0)
    assert squad_em_f1("", ["mat"]) == (0.0, 0.0)


def test_squad_scores_with_missing_prediction() -> None:
    ex = [
        SquadExample("a", "q?", "c", ("on the mat",), (0,), False),
        SquadExample("b", "q?", "c", (), (), True),
        SquadExample("c", "q?", "c", ("Paris",), (0,), False),
        SquadExample("d", "q?", "c", ("a cat sat on",), (0,), False),
    ]
    # a: exact (1, 1); b: missing -> "" on an impossible question (1, 1); c: wrong (0, 0); d: (0, 0.8).
    preds = {"a": "On the mat.", "c": "London", "d": "the cat sat", "zzz": "ignored"}
    out = squad_scores(preds, ex)
    assert out["exact_match"] == pytest.approx(100 * 2 / 4)
    assert out["f1"] == pytest.approx(100 * 2.8 / 4)
    assert out["total"] == 4 and out["missing"] == 1
    assert out["has_answer"] == 3 and out["no_answer"] == 1
    assert out["has_answer_f1"] == pytest.approx(100 * 1.8 / 3)
    assert out["no_answer_exact_match"] == pytest.approx(100.0)
    # Missing prediction on an answerable question scores 0.
    out = squad_scores({}, ex[:1])
    assert out["exact_match"] == 0.0 and out["f1"] == 0.0 and out["missing"] == 1
    assert "no_answer_f1" not in out
