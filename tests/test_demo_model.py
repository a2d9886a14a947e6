"""Demo-model plumbing (docs/demo_model.md): a float16 export (scripts/export_demo_model.py) loads exactly into an
fp32 model, by copy and on the meta device, with the tied matrix stored once; the embedded model
(example/model/) decides the example files and `make demo`'s conversation as measured when it was embedded."""
import json
import pathlib

import pytest
import torch

import duplex_inference
from modules.checkpoint import (EMBEDDING_KEY, LM_HEAD_KEY, MODEL_FILE, load_reference_checkpoint,
                               save_reference_checkpoint)
from modules.model import load_inference_network, load_model_hparams, resolve_checkpoint_path
from scripts.export_demo_model import export
from src import evaluate, prompts

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO_YAML = ROOT / "duplex" / "duplex_demo.yaml"
EXAMPLE_WAVS = sorted((ROOT / "example").glob("*.wav"))


def test_half_precision_export_loads_into_fp32_model(tmp_path):
    """fp16 storage -> fp32 model, both by copy (built LM) and by assignment (meta LM), tie kept."""
    source = load_model_hparams(overrides={"seed": 1})
    save_reference_checkpoint(source["model"], tmp_path / "save", source["normalizer"])
    export(tmp_path / "save", tmp_path / "half")
    expected = {key: value.half().float() for key, value in source["model"].state_dict().items()}
    for overrides in ({"seed": 2}, {"seed": 2, "lm_device": "meta"}):
        target = load_model_hparams(overrides=overrides)
        load_reference_checkpoint(target["model"], tmp_path / "half", normalizer=target["normalizer"])
        state = target["model"].state_dict()
        assert all(value.dtype == torch.float32 for value in state.values() if value.is_floating_point())
        assert all(torch.equal(state[key], expected[key]) for key in expected), overrides
        lm = target["model"].lm.model
        assert lm.lm_head.weight is lm.get_input_embeddings().weight


def test_export_stores_tied_matrix_once(tmp_path):
    source = load_model_hparams(overrides={"seed": 1})
    save_reference_checkpoint(source["model"], tmp_path / "save", source["normalizer"])
    folder = export(tmp_path / "save", tmp_path / "half")
    state = torch.load(folder / MODEL_FILE, weights_only=True)
    assert state[EMBEDDING_KEY].untyped_storage().data_ptr() == state[LM_HEAD_KEY].untyped_storage().data_ptr()
    matrix_bytes = state[EMBEDDING_KEY].numel() * 2
    assert matrix_bytes < (folder / MODEL_FILE).stat().st_size < 1.5 * matrix_bytes


# The embedded model's greedy state token on the 7 example files, as measured when it was embedded (2026-12-05,
# docs/demo_model.md "The embedded model"): 5 of 7. The files are flite, an engine the model never heard in
# training; two are missed (background talk answered, a question ignored).
EXAMPLE_DECISIONS = {
    "ignore_dinner": prompts.RESPONSE,  # missed
    "ignore_umbrella": prompts.IGNORE,
    "incomplete_capital": prompts.INCOMPLETE,
    "interrupt_mountain": prompts.RESPONSE,
    "question_capital": prompts.RESPONSE,
    "question_math": prompts.RESPONSE,
    "question_spider": prompts.IGNORE,  # missed
}


def test_embedded_model_decides_the_example_files_as_measured():
    """duplex_demo.yaml loads the embedded model (example/model/, the speedrun network) and its greedy state token
    (python -m src.evaluate --wavs) decides the 7 example files as measured when it was embedded (5/7, every class
    found at least once); the same input gives the same decisions, alone or all 7 decoded together, and the reply
    to cut-off speech is the appendix B.1 kind."""
    hparams, tokenizer = evaluate.load_model(DEMO_YAML, None, num_state_tokens=3)
    model = evaluate.GreedyModel(hparams["net"], tokenizer, 3, max_new_tokens=24,
                                 asr_instruction=prompts.ASR_SENTENCES[0], batch_size=len(EXAMPLE_WAVS))
    assert model.generator.lm.config.num_hidden_layers == 6 and model.generator.lm.config.hidden_size == 256
    items = evaluate.wav_utterances(EXAMPLE_WAVS)
    first, records = evaluate.evaluate_utterances(model, items, ["state"], progress=False, batch_size=1)
    second, again = evaluate.evaluate_utterances(model, items, ["state"], progress=False, batch_size=len(items))
    assert records == again
    assert {r["id"]: r["state"] for r in records} == EXAMPLE_DECISIONS, records
    assert first["state"]["count"] == 7 and first["state"]["accuracy"] == pytest.approx(5 / 7)
    assert all(v["support"] > 0 and v["recall"] > 0 for v in first["state"]["per_class"].values())
    cut = next(r for r in records if r["expected_state"] == prompts.INCOMPLETE)
    assert "cut off" in cut["reply"]


def test_demo_yaml_finds_its_model_from_any_directory(tmp_path, monkeypatch):
    """`checkpoint: ../example/model` is relative to the YAML when it is not found from the current directory
    (modules.model.resolve_checkpoint_path), so the demo runs from anywhere; a missing path stays an error."""
    monkeypatch.chdir(tmp_path)
    hparams = load_inference_network(DEMO_YAML)
    assert pathlib.Path(hparams["checkpoint"]).resolve() == (ROOT / "example" / "model").resolve()
    assert resolve_checkpoint_path("no/such/save", DEMO_YAML) == pathlib.Path("no/such/save")
    (tmp_path / "save").mkdir()
    assert resolve_checkpoint_path("save", DEMO_YAML) == pathlib.Path("save")  # the current directory first


def test_expected_state_comes_from_the_file_name():
    utterances = evaluate.wav_utterances([ROOT / "example" / "question_capital.wav",
                                          ROOT / "example" / "ignore_dinner.wav"])
    assert [u.state for u in utterances] == [prompts.RESPONSE, prompts.IGNORE]
    with pytest.raises(evaluate.EvaluationError, match="cannot tell the expected state"):
        evaluate.wav_utterances([pathlib.Path("hello.wav")])


def test_make_demo_conversation_plays_as_measured_with_the_papers_settings(tmp_path):
    """What `make demo` runs: example/conversation.yaml on the embedded model with the paper's engine settings
    (each turn heard on the conversation so far, state tokens sampled; duplex_demo.yaml). As measured when it was
    embedded: 3 of the 4 speech slices get the state token the script expects. The question starts a reply; the
    background talk during it is answered (the miss), which interrupts it; the real interruption takes over again;
    the cut-off question waits, and the silence after it forces a reply. The same seed replays the same timeline."""
    def play(name):
        output = tmp_path / name
        code = duplex_inference.main([str(DEMO_YAML), "--script", str(ROOT / "example" / "conversation.yaml"),
                                      "--output", str(output), "--quiet"])
        assert code == 0
        return [json.loads(line) for line in output.read_text().splitlines()]

    demo = load_inference_network(DEMO_YAML)
    assert demo["duplex"]["listener_context"] == "conversation" and not demo["duplex"]["state_sampling"].get("greedy")
    records = play("a.jsonl")
    expected = [r for r in records if r.get("expect")]
    assert [r["state_token"] for r in expected] == [
        prompts.RESPONSE, prompts.RESPONSE, prompts.RESPONSE, prompts.INCOMPLETE], expected
    assert sum(r["state_token"] == r["expect"] for r in expected) == 3
    assert expected[0]["changes"] == ["listen_start", "reply_start"]
    assert expected[1]["changes"] == expected[2]["changes"] == ["listen_start", "interrupt", "reply_start"]
    assert expected[3]["changes"] == ["listen_start"]
    forced = records[records.index(expected[3]) + 1]
    assert "forced_reply" in forced["changes"] and forced["text"]
    assert play("b.jsonl") == records
