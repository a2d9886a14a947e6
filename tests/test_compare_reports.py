"""src.compare_reports: src.evaluate reports side by side, matched across machines, against #14's targets."""
import copy
import json
import pathlib

import pytest

from src import compare_reports

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMBEDDED_REPORT = ROOT / "docs" / "demo_model" / "embedded-2026-12-05" / "report.json"
EMBEDDED_REAL_REPORT = ROOT / "docs" / "demo_model" / "embedded-2026-12-05" / "real-asterisk" / "report.json"
TARGETS = ROOT / "hparams" / "speedrun" / "targets.yaml"


def moved(report: dict, prefix: str) -> dict:
    """The same report as another machine writes it: its result names under another folder."""
    return {**report, "results": {name.replace("<work>", prefix): result
                                  for name, result in report["results"].items()}}


def write(path: pathlib.Path, report: dict) -> str:
    path.write_text(json.dumps(report))
    return str(path)


def test_the_embedded_models_report_meets_the_two_state_targets_only(capsys):
    assert compare_reports.main([f"embedded={EMBEDDED_REPORT}", "--targets", str(TARGETS)]) == 0
    text = capsys.readouterr().out
    assert "| corpus/test.csv | WER | 85.0 % |" in text
    assert "| state tokens, macro-F1 (≥ 0.97) | corpus/test.csv | 1.000 ✓ |" in text
    assert "| WER on real human recordings, alsa (16 words) (≤ 35 %) | real/real.csv | 375.0 % ✗ |" in text
    assert "| real/real-asterisk.csv | - |" in text  # not in this report: not met, not counted as met
    assert "- embedded: 2 of 9 targets met" in text


def test_several_reports_of_one_model_are_merged_under_its_label(tmp_path, capsys):
    assert compare_reports.main([f"embedded={EMBEDDED_REPORT},{EMBEDDED_REAL_REPORT}",
                                 "--targets", str(TARGETS)]) == 0
    text = capsys.readouterr().out
    assert "| real/real-asterisk.csv | WER | 153.7 % |" in text and "| corpus/test.csv | WER | 85.0 % |" in text
    assert "| WER on real human recordings, 551 asterisk prompts (≤ 35 %) | real/real-asterisk.csv | 153.7 % ✗ |" in text
    assert compare_reports.main([f"x={EMBEDDED_REPORT},{EMBEDDED_REPORT}"]) == 2
    assert "is also in an earlier report of the same label" in capsys.readouterr().err


def test_reports_from_two_machines_are_matched_and_the_last_is_judged_against_the_first(tmp_path, capsys):
    report = json.loads(EMBEDDED_REPORT.read_text())
    other = moved(copy.deepcopy(report), "/root/runs/speedrun/work")
    other["results"]["/root/runs/speedrun/work/corpus/test.csv"]["asr"]["WER"] = 40.0  # better
    other["results"]["/root/runs/speedrun/work/corpus/conversations"]["slice_state"]["accuracy"] = 0.5  # worse
    out = tmp_path / "compare" / "compare.md"
    assert compare_reports.main([f"old={write(tmp_path / 'a.json', moved(report, '/work/s12/work'))}",
                                 f"new={write(tmp_path / 'b.json', other)}", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.read_text() == text
    assert "| corpus/test.csv | WER | 85.0 % | 40.0 % |" in text
    shared = len([line for line in text.splitlines() if line.startswith("| corpus/") or line.startswith("| real/")])
    latency_rows = text.count("latency_median_s")
    assert (f"**new against old:** better on 1, worse on 1, equal on {shared - latency_rows - 2} of "
            f"{shared - latency_rows} shared measures") in text
    assert "Worse on: corpus/conversations slices_right." in text


def test_a_measure_without_data_is_shown_empty_and_not_counted():
    results = {"real/real.csv": {"asr": {"WER": 50.0, "CER": 40.0, "utterances": 8},
                                 "state": {"accuracy": 0.0, "count": 0, "macro_f1": 0.0, "per_class": {}}}}
    rows = compare_reports.rows({"a": results})
    assert rows == [("real/real.csv", "WER"), ("real/real.csv", "CER")]
    assert compare_reports.figure(results, "real/real.csv", "state_accuracy") is None
    assert compare_reports.show(None, "state_accuracy") == "-"


def test_min_recall_skips_classes_without_support():
    state = {"count": 3, "per_class": {"respond": {"recall": 1.0, "support": 3},
                                       "ignore": {"recall": 0.0, "support": 0}}}
    assert compare_reports._min_recall(state) == 1.0


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("# Evaluation report\n", "not JSON"),
    ('{"command": "x"}', "no 'results' object"),
])
def test_bad_reports_are_named(tmp_path, capsys, content, message):
    path = tmp_path / "report.json"
    if content is not None:
        path.write_text(content)
    assert compare_reports.main([str(path)]) == 2
    error = capsys.readouterr().err
    assert str(path) in error and message in error


def test_two_reports_with_one_label_are_refused(capsys):
    assert compare_reports.main([f"x={EMBEDDED_REPORT}", f"x={EMBEDDED_REPORT}"]) == 2
    assert "two reports are labelled 'x'" in capsys.readouterr().err


@pytest.mark.parametrize("entry, message", [
    ("{result: corpus/test.csv, measure: BLEU, at_most: 8}", "measure 'BLEU' is not one of"),
    ("{result: corpus/test.csv, measure: WER, at_most: 8, at_least: 1}", "exactly one of at_most and at_least"),
    ("{measure: WER, at_most: 8}", "no 'result'"),
])
def test_bad_targets_are_named(tmp_path, capsys, entry, message):
    targets = tmp_path / "targets.yaml"
    targets.write_text(f"targets:\n  - {entry}\n")
    assert compare_reports.main([str(EMBEDDED_REPORT), "--targets", str(targets)]) == 2
    error = capsys.readouterr().err
    assert f"{targets}: target 1" in error and message in error
