"""python -m src.evaluate: known scores from scripted fake models on committed fixtures (tests/data/evaluate/),
clear errors before any work, and an end-to-end run of the tiny model from a stage-1 checkpoint."""
import json
import pathlib

import pytest
import torch

from duplex.session import DuplexConfig, DuplexSession
from modules.checkpoint import save_reference_checkpoint
from modules.model import load_model_hparams
from src import evaluate, prompts
from tests.test_session import IGNORE, INCOMPLETE, PROMPTS, RESPOND, TOKENS, CharTokenizer, ScriptedRuntime

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "evaluate"
MINI = DATA / "mini.csv"
TINY_YAML = ROOT / "duplex" / "duplex_tiny.yaml"


def code_of(wav: torch.Tensor) -> int:
    """The fixture's speech code: every file's loud part has amplitude code / 100."""
    return round(float(wav.abs().max()) * 100)


class ScriptedModel:
    """Fake model: transcripts and (state, reply) chosen per speech code of tests/data/evaluate/mini.csv."""

    TRANSCRIPTS = {1: "The cat sat on a mat.", 2: "One, two, three, four."}
    RESPONSES = {3: (prompts.RESPONSE, "The capital of France is Paris."),
                 4: (prompts.RESPONSE, "Three plus four is eight."),
                 5: (prompts.INCOMPLETE, "It seems like your question got cut off."),
                 6: (prompts.RESPONSE, "Nice."),
                 7: (prompts.IGNORE, "Sorry, could you explain that a bit more?")}

    def transcribe(self, wavs):
        return [self.TRANSCRIPTS[code_of(wav)] for wav in wavs]

    def respond(self, wavs):
        return [self.RESPONSES[code_of(wav)] for wav in wavs]


def test_manifest_scores_of_a_scripted_model():
    """WER: "the cat sat on the mat" -> "...on a mat" (1 of 6 words) and "one two three" -> "... four" (1 of 3):
    2/9. CER: "the"->"a" is 3 of 22 characters, " four" 5 of 13: 8/35. States (expected -> predicted): respond
    ->respond twice, respond->ignore, incomplete->incomplete, ignore->respond: respond P=R=2/3, incomplete 1,
    ignore P=R=0, macro-F1 (2/3+1+0)/3. Answers: "Paris" yes, "seven" no (eight), "Baku" no: 1/3."""
    utterances = evaluate.read_manifest(MINI, evaluate.METRICS)
    scores, records = evaluate.evaluate_utterances(ScriptedModel(), utterances, evaluate.METRICS, progress=False)
    assert evaluate.evaluate_utterances(ScriptedModel(), utterances, evaluate.METRICS, progress=False,
                                        batch_size=4) == (scores, records)  # batches keep each record in place
    assert scores["asr"]["WER"] == pytest.approx(100 * 2 / 9)
    assert scores["asr"]["CER"] == pytest.approx(100 * 8 / 35)
    state = scores["state"]
    assert state["count"] == 5 and state["accuracy"] == pytest.approx(3 / 5)
    assert state["per_class"]["respond"]["precision"] == pytest.approx(2 / 3)
    assert state["per_class"]["respond"]["f1"] == pytest.approx(2 / 3)
    assert state["per_class"]["incomplete"]["f1"] == 1.0 and state["per_class"]["ignore"]["f1"] == 0.0
    assert state["macro_f1"] == pytest.approx(5 / 9)
    assert state["confusion"]["respond"] == {"respond": 2, "incomplete": 0, "ignore": 1, "(none)": 0}
    assert scores["answer"] == {"accuracy": pytest.approx(1 / 3), "right": 1, "count": 3}
    assert [r["id"] for r in records if r.get("answer_right")] == ["3"]


def coded_encoder(wav):
    """(N,) -> (1, N // 1600, 1) positions holding -code (the scripted runtime's speech marker)."""
    return torch.full((1, wav.numel() // 1600, 1), -float(code_of(wav)))


def scripted_sessions():
    decisions = {1: RESPOND, 2: IGNORE, 3: INCOMPLETE, 4: INCOMPLETE, 5: INCOMPLETE}
    replies = {1: "Paris.", 4: "Eight.", 5: prompts.INCOMPLETE_REPLIES[0]}
    runtime = ScriptedRuntime(TOKENS, decisions, replies)
    config = DuplexConfig(slice_seconds=3.0, tokens_per_slice=4, state_sampling=evaluate_greedy())
    return lambda: DuplexSession(runtime, coded_encoder, CharTokenizer(), config, prompts=PROMPTS)


def evaluate_greedy():
    from duplex.sampling import SamplingConfig
    return SamplingConfig(greedy=True)


def test_script_folder_scores_and_latency():
    """tests/data/evaluate/scripts/coded.yaml on the scripted LM: slices right 4/5 (the second half of the split
    question stays incomplete); answers right 2/3 ("Paris." yes, the forced "Eight." no, the forced appendix
    B.1 reply yes); latency: speech ends 2 s into each 3 s file; the answer starts in the same slice (1.0 s) or,
    forced, in the silent slice after it (4.0 s)."""
    files = evaluate.script_files(DATA / "scripts")
    totals, records = evaluate.evaluate_scripts(files, scripted_sessions(), progress=False)
    assert totals["slice_state"]["count"] == 5 and totals["slice_state"]["accuracy"] == pytest.approx(0.8)
    assert totals["slice_state"]["confusion"]["respond"]["incomplete"] == 1
    assert totals["answer"] == {"accuracy": pytest.approx(2 / 3), "right": 2, "count": 3}
    assert [a["right"] for a in records[0]["answers"]] == [True, False, True]
    assert records[0]["answers"][0]["reply"] == "Paris."
    assert records[0]["latencies_s"] == pytest.approx([1.0, 4.0, 4.0])
    assert totals["latency_s"]["mean"] == pytest.approx(3.0)


def test_report_files(tmp_path):
    utterances = evaluate.read_manifest(MINI, evaluate.METRICS)
    scores, records = evaluate.evaluate_utterances(ScriptedModel(), utterances, evaluate.METRICS, progress=False)
    header = {"command": "test", "yaml": "x.yaml", "checkpoint": None, "device": "cpu", "date": "today"}
    evaluate.write_report(tmp_path, header, {"mini.csv": scores}, records)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["results"]["mini.csv"]["answer"]["right"] == 1
    assert (tmp_path / "confusion-mini.png").read_bytes()[:4] == b"\x89PNG"
    assert "WER 22.22 %" in (tmp_path / "report.md").read_text()
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 7



def test_a_manifest_without_expected_states_reports_none_to_score(tmp_path):
    """Real recordings come with transcripts only: the report says there is no state to score, instead of an
    accuracy of 0 over no decisions and a link to a confusion matrix that was never drawn."""
    header = {"command": "test", "yaml": "x.yaml", "checkpoint": None, "device": "cpu", "date": "today"}
    evaluate.write_report(tmp_path, header, {"real.csv": {"state": evaluate.state_scores([])}}, [])
    report = (tmp_path / "report.md").read_text()
    assert "state: none to score" in report
    assert "confusion-real.png" not in report and not (tmp_path / "confusion-real.png").exists()


def test_max_rows_takes_an_evenly_spaced_deterministic_subset(capsys):
    every = [u.utt_id for u in evaluate.read_manifest(MINI, evaluate.METRICS)]
    some = [u.utt_id for u in evaluate.read_manifest(MINI, evaluate.METRICS, max_rows=3)]
    assert len(every) > 3 and len(some) == 3
    assert some == [every[i * len(every) // 3] for i in range(3)] and some[0] == every[0]
    assert evaluate.read_manifest(MINI, evaluate.METRICS, max_rows=len(every) + 5) == \
        evaluate.read_manifest(MINI, evaluate.METRICS)
    with pytest.raises(SystemExit):
        evaluate.parse_args([str(TINY_YAML), "--out", "x", "--max-rows", "0"])
    assert "not a whole number of at least 1" in capsys.readouterr().err

def test_answer_key_is_matched_as_whole_normalised_words():
    assert evaluate.contains_key("The capital of France is PARIS!", "Paris")
    assert not evaluate.contains_key("Parisian food.", "paris")
    assert evaluate.contains_key("It is seventy two.", "72")
    assert evaluate.is_incomplete_reply(prompts.INCOMPLETE_REPLIES[2][:40])
    assert not evaluate.is_incomplete_reply("The capital of France is Paris.")


# ---------------------------------------------------------------- errors before any work
def run_cli(tmp_path, *args):
    return evaluate.main([str(TINY_YAML), "--out", str(tmp_path / "report"), "--no-progress", *args])


def test_missing_column_is_an_error_naming_the_metric(tmp_path, capsys):
    lines = MINI.read_text().splitlines()
    (tmp_path / "audio").symlink_to(DATA / "audio")
    no_answer = tmp_path / "no_answer.csv"
    no_answer.write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")
    assert run_cli(tmp_path, "--manifest", str(no_answer)) == 2
    message = capsys.readouterr().err
    assert "missing column(s) ['answer']" in message and "--metrics wer state" in message
    assert not (tmp_path / "report").exists()


def test_missing_audio_is_an_error(tmp_path, capsys):
    broken = tmp_path / "broken.csv"
    broken.write_text(MINI.read_text())  # its audio/ paths do not exist beside the copy
    assert run_cli(tmp_path, "--manifest", str(broken)) == 2
    assert "7 audio file(s) not found" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


@pytest.fixture(scope="module")
def stage1_checkpoint(tmp_path_factory):
    """A tiny stage-1 save folder: 50278 vocabulary rows (one added token)."""
    folder = tmp_path_factory.mktemp("stage1") / "save"
    hparams = load_model_hparams(overrides={"num_state_tokens": 1, "seed": 5})
    save_reference_checkpoint(hparams["model"], folder, hparams["normalizer"])
    return folder


def test_stage1_checkpoint_is_refused_for_states_before_loading(tmp_path, capsys, stage1_checkpoint, monkeypatch):
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for source in (["--manifest", str(MINI)], ["--scripts", str(DATA / "scripts")]):
        assert run_cli(tmp_path, "--checkpoint", str(stage1_checkpoint), *source) == 2
        assert "stage-1/2 checkpoint (50278 vocabulary rows" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_training_folder_is_refused(tmp_path, capsys, stage1_checkpoint):
    inside = stage1_checkpoint / "eval"
    assert evaluate.main([str(TINY_YAML), "--out", str(inside), "--manifest", str(MINI), "--metrics", "wer",
                          "--checkpoint", str(stage1_checkpoint)]) == 2
    assert "inside the training folder" in capsys.readouterr().err
    beside = stage1_checkpoint.parent / "report"  # the experiment folder of the checkpoint
    assert evaluate.main([str(TINY_YAML), "--out", str(beside), "--manifest", str(MINI), "--metrics", "wer",
                          "--checkpoint", str(stage1_checkpoint)]) == 2
    assert "experiment folder" in capsys.readouterr().err
    assert not inside.exists() and not beside.exists()


def test_stage1_checkpoint_gets_a_wer_report_end_to_end(tmp_path, stage1_checkpoint):
    """The real path: tiny network from a stage-1 checkpoint, greedy transcripts of the two ASR rows."""
    assert run_cli(tmp_path, "--checkpoint", str(stage1_checkpoint), "--manifest", str(MINI), "--metrics", "wer",
                   "--max-new-tokens", "3") == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    asr = report["results"][str(MINI)]["asr"]
    assert asr["utterances"] == 2 and asr["words"] == 9 and asr["WER"] >= 0
    assert "state" not in report["results"][str(MINI)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_gives_the_cpu_decisions_on_the_embedded_model(tmp_path):
    """The same command on CUDA (GPU runtime, graphed encoder in the scripts) decides the example files and the
    example conversation as on the CPU."""
    demo, wavs = ROOT / "duplex" / "duplex_demo.yaml", sorted(str(p) for p in (ROOT / "example").glob("*.wav"))
    results = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        assert evaluate.main([str(demo), "--device", device, "--wavs", *wavs, "--scripts",
                              str(ROOT / "example" / "conversation.yaml"), "--out", str(out), "--no-progress"]) == 0
        results[device] = json.loads((out / "report.json").read_text())["results"]
    assert results["cuda"]["--wavs"]["state"]["confusion"] == results["cpu"]["--wavs"]["state"]["confusion"]
    script = str(ROOT / "example" / "conversation.yaml")
    assert results["cuda"][script]["slice_state"]["accuracy"] == results["cpu"][script]["slice_state"]["accuracy"]


def test_scores_are_broken_down_by_voice_family_when_the_corpus_names_its_speakers(tmp_path):
    """A src.corpus manifest (LibriSpeech paths) with speakers.csv beside it: WER and state accuracy per engine."""
    import shutil
    rows = MINI.read_text().splitlines()
    out = [rows[0]]
    for number, row in enumerate(rows[1:]):
        fields = row.split(",")
        speaker = "1000" if number % 2 == 0 else "1001"
        target = tmp_path / "test" / speaker / "0" / pathlib.PurePath(fields[2]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / fields[2], target)
        fields[2] = str(target.relative_to(tmp_path))
        out.append(",".join(fields))
    (tmp_path / "test.csv").write_text("\n".join(out) + "\n")
    (tmp_path / "speakers.csv").write_text("speaker,engine,voice,rate,pitch,split\n"
                                          "1000,espeak,en-us+m3,1.0,0.0,test\n1001,dectalk,paul,1.0,0.0,test\n")
    utterances = evaluate.read_manifest(tmp_path / "test.csv", evaluate.METRICS)
    assert [u.family for u in utterances] == ["espeak", "dectalk"] * 3 + ["espeak"]
    scores, records = evaluate.evaluate_utterances(ScriptedModel(), utterances, evaluate.METRICS, progress=False)
    families = scores["by_voice_family"]
    assert families["espeak"]["asr"]["WER"] == pytest.approx(100 / 6)  # asr-1: 1 error in 6 words
    assert families["dectalk"]["asr"]["WER"] == pytest.approx(100 / 3)  # asr-2: 1 error in 3 words
    assert families["espeak"]["decisions"] + families["dectalk"]["decisions"] == scores["state"]["count"]
    assert "| espeak | 16.67 % | 1 |" in evaluate.markdown(
        {"command": "c", "yaml": "y", "checkpoint": "k", "device": "cpu", "date": "d"}, {"test": scores})
    plain, _ = evaluate.evaluate_utterances(ScriptedModel(), evaluate.read_manifest(MINI, evaluate.METRICS),
                                            evaluate.METRICS, progress=False)
    assert "by_voice_family" not in plain  # no speakers.csv: no breakdown
