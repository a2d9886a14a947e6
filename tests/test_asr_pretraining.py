"""ASR pre-training (train_asr.py): the tiny recipe on the committed sample corpus, resumed, and its save folder
starting stage 1 through `asr_checkpoint_folder`; the full-size YAML against the reference's encoder keys; clear
errors before any work; the decoder's padding handling and the character tokens."""
import csv
import pathlib

import pytest
import torch
from hyperpyyaml import load_hyperpyyaml

from modules.asr_decoder import ConMambaMambaASR, memory_then_target
from modules.checkpoint import DROPPED_BUFFERS, NORMALIZER_FILE, find_checkpoints, read_model_state
from modules.model import load_model_hparams
from src.asr_pretraining import CharTokens, read_asr_manifest, report_unknown_characters, run_asr_pretraining
from src.brain import DuplexBrain
from src.handoff import load_previous_stage
from src.stages import run_stage

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "corpus"
REFERENCE_KEYS = pathlib.Path("/work/shared/reference/upstream_model_ckpt_keys.tsv")
ENCODER_PREFIXES = ("0.", "1.custom_src_module.", "1.encoder.")


def train_asr(out, epochs, *extra):
    argv = [str(ROOT / "hparams" / "asr" / "tiny.yaml"), f"--data_folder={SAMPLE}", f"--output_folder={out}",
            "--device=cpu", "--noprogressbar", f"--number_of_epochs={epochs}", "--test_max_tokens=4", *extra]
    return run_asr_pretraining(argv)


@pytest.fixture(scope="module")
def asr_run(tmp_path_factory):
    """One epoch, then the same command with two epochs: the second run resumes and trains epoch 2 only."""
    out = tmp_path_factory.mktemp("asr")
    first = train_asr(out, 1)
    second = train_asr(out, 2)
    return out, first, second


@pytest.mark.slow
def test_tiny_pretraining_trains_both_losses_and_resumes(asr_run):
    out, first, second = asr_run
    assert first.hparams.epoch_counter.current == 1 and second.hparams.epoch_counter.current == 2
    log = (out / "train_log.txt").read_text()
    assert log.count("epoch: 1,") == 1 and log.count("epoch: 2,") == 1, "epoch 1 must not be trained twice"
    assert len(second.train_losses) > 0 and all(torch.isfinite(torch.tensor(second.train_losses)))
    stats = second.last_stage_stats  # test pass on the average of the kept checkpoints
    assert {"loss", "ACC", "WER_ctc", "WER"} <= set(stats)
    folders = find_checkpoints(out / "save")
    assert len(folders) == 2 and all((folder / NORMALIZER_FILE).is_file() for folder in folders)


@pytest.mark.slow
def test_save_folder_starts_stage_1_with_every_encoder_key_and_the_normaliser(asr_run, tmp_path):
    out, _, _ = asr_run
    saved = read_model_state(out / "save")  # the average stage 1 starts from
    assert {key.split(".")[0] for key in saved} == {"0", "1", "2", "3"}
    stage1 = load_model_hparams(ROOT / "hparams" / "model" / "tiny.yaml", {"num_state_tokens": 1})
    model, normalizer = stage1["model"], stage1["normalizer"]
    init_from = {"folder": str(out / "save"), "prefixes": list(ENCODER_PREFIXES), "load_normalizer": True}
    load_previous_stage(init_from, model, normalizer)
    encoder_keys = [key for key in model.state_dict() if key.startswith(ENCODER_PREFIXES)]
    assert encoder_keys and all(torch.equal(model.state_dict()[key], saved[key]) for key in encoder_keys)
    newest = torch.load(find_checkpoints(out / "save")[-1] / NORMALIZER_FILE, weights_only=False)
    assert newest["count"] > 0 and normalizer.count == newest["count"]
    assert torch.equal(normalizer.glob_mean, newest["glob_mean"]) and torch.equal(normalizer.glob_std,
                                                                                    newest["glob_std"])
    # and the stage-1 recipe itself takes the folder (YAML key asr_checkpoint_folder), trains and tests
    brain = run_stage(DuplexBrain, [str(ROOT / "hparams" / "tiny" / "train_stage1.yaml"), f"--data_folder={SAMPLE}",
                                    f"--output_folder={tmp_path / 'stage1'}", "--device=cpu", "--noprogressbar",
                                    "--number_of_epochs=1", "--test_max_new_tokens=0",
                                    f"--asr_checkpoint_folder={out / 'save'}"])
    assert brain.hparams.init_from["folder"] == str(out / "save")
    stage1_folders = find_checkpoints(tmp_path / "stage1" / "save")
    assert len(stage1_folders) == 1
    carried = torch.load(stage1_folders[0] / NORMALIZER_FILE, weights_only=False)
    assert carried["count"] > newest["count"], "stage 1 continues the ASR statistics (tiny YAML: load_normalizer)"


def reference_encoder_shapes():
    shapes = {}
    for line in REFERENCE_KEYS.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _ = line.split("\t")
        if key.startswith(("0.", "1.")) and key not in DROPPED_BUFFERS:
            shapes[key] = tuple(int(size) for size in shape.split("x"))
    return shapes


@pytest.mark.skipif(not REFERENCE_KEYS.is_file(), reason="reference key list not available")
def test_full_size_yaml_builds_on_meta_with_the_reference_encoder_keys_and_shapes(tmp_path):
    # SpeedPerturb builds a resampling kernel from data, which the meta device cannot hold: built separately
    overrides = {"data_folder": str(tmp_path), "output_folder": str(tmp_path / "out"), "speed_perturb": None}
    with torch.device("meta"), open(ROOT / "hparams" / "asr" / "conmambamamba_large.yaml") as handle:
        hparams = load_hyperpyyaml(handle, overrides)
    state = hparams["model"].state_dict()
    ours = {key: tuple(value.shape) for key, value in state.items() if key.startswith(ENCODER_PREFIXES)}
    assert ours == reference_encoder_shapes()
    decoder_layers = {key.split(".")[3] for key in state if key.startswith("1.decoder.layers.")}
    assert len(decoder_layers) == 6
    assert state["2.w.weight"].shape == state["3.w.weight"].shape == (len(CharTokens()), 512)
    assert hparams["ctc_weight"] == 0.3 and hparams["label_smoothing"] == 0.1
    assert hparams["lr_peak"] == pytest.approx(8e-4) and hparams["grad_accumulation_factor"] == 8
    assert hparams["noam_annealing"].n_warmup_steps == 30000 // 8
    assert hparams["keep_checkpoints"] == 10 and hparams["epoch_counter"].limit == 120
    assert hparams["train_batch_sampler"]["max_batch_length"] == 500 and hparams["precision"] == "bf16"


@pytest.mark.parametrize("size", ["tiny", "demo"])
def test_small_yaml_encoder_matches_the_stage_model(size, tmp_path):
    """The encoder keys and shapes of hparams/asr/<size>.yaml equal those of hparams/model/<size>.yaml."""
    with open(ROOT / "hparams" / "asr" / f"{size}.yaml") as handle:
        asr = load_hyperpyyaml(handle, {"data_folder": str(tmp_path), "output_folder": str(tmp_path)})
    stage = load_model_hparams(ROOT / "hparams" / "model" / f"{size}.yaml")
    shapes = {key: value.shape for key, value in asr["model"].state_dict().items() if key.startswith(ENCODER_PREFIXES)}
    expected = {key: value.shape for key, value in stage["model"].state_dict().items()
                if key.startswith(ENCODER_PREFIXES)}
    assert shapes == expected


# ---- bad input: clear errors before any work ------------------------------------------------------------------
def write_manifest(path, rows, columns=("ID", "duration", "wav", "wrd")):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def sample_rows():
    with open(SAMPLE / "train.csv", newline="") as handle:
        return [{**row, "wav": str(SAMPLE / row["wav"])} for row in csv.DictReader(handle)]


def test_missing_column_is_named(tmp_path):
    path = write_manifest(tmp_path / "train.csv", sample_rows(), columns=("ID", "duration", "wav"))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['wrd'\]"):
        read_asr_manifest(path)


def test_missing_audio_is_named(tmp_path):
    rows = sample_rows()
    rows[1]["wav"] = str(tmp_path / "gone.flac")
    with pytest.raises(FileNotFoundError, match="1 audio file.*gone.flac"):
        read_asr_manifest(write_manifest(tmp_path / "train.csv", rows))


def test_bad_manifest_stops_the_recipe_before_any_model_or_checkpoint(tmp_path):
    rows = sample_rows()
    rows[0]["wav"] = str(tmp_path / "gone.flac")
    bad = write_manifest(tmp_path / "bad.csv", rows)
    good = write_manifest(tmp_path / "good.csv", sample_rows())
    with pytest.raises(FileNotFoundError, match="gone.flac"):
        train_asr(tmp_path / "out", 1, "--data_prep=null", f"--train_csv={good}", f"--valid_csv={good}",
                  f"--test_csvs=[{bad}]")
    assert not list((tmp_path / "out").glob("save/CKPT+*")) and not (tmp_path / "out" / "train_log.txt").exists()


def test_unknown_characters_are_reported(tmp_path, caplog):
    rows = sample_rows()
    rows[0]["wrd"] = "señor, ça va"
    dataset = read_asr_manifest(write_manifest(tmp_path / "train.csv", rows))
    assert report_unknown_characters(dataset, CharTokens(), "train.csv") == {"ñ": 1, ",": 1, "ç": 1}
    assert "outside the ASR set" in caplog.text


def test_rows_without_transcript_are_skipped(tmp_path):
    rows = sample_rows()
    rows[0]["wrd"] = ""
    dataset = read_asr_manifest(write_manifest(tmp_path / "train.csv", rows))
    assert len(dataset) == len(rows) - 1


# ---- pieces ---------------------------------------------------------------------------------------------------
def test_char_tokens_round_trip_and_ctc_collapse():
    tokens = CharTokens()
    ids = tokens.encode("Hello,  World 42")
    assert tokens.decode(ids) == "hello world 42"  # the comma is unknown: <unk>, decoded as nothing
    assert ids.count(CharTokens.UNK) == 1 and tokens.unknown_characters("Café, ok") == {"é", ","}
    a, b = tokens.ids["a"], tokens.ids["b"]
    assert tokens.ctc_collapse([0, a, a, 0, a, b, b, 0]) == [a, a, b]
    assert min(tokens.ids.values()) == len(CharTokens.SPECIALS)


def test_decoder_output_does_not_depend_on_padding_after_the_valid_frames():
    """A row decoded with padded encoder frames equals the same row decoded alone (the reference's cross mixer
    read the padding between memory and target)."""
    torch.manual_seed(0)
    asr = ConMambaMambaASR(vocab_size=12, input_size=40, d_model=16, num_layers=1, num_decoder_layers=2,
                           d_ffn=32, kernel_size=3, d_state=4).eval()
    memory = torch.randn(2, 9, 16)  # (B, T, D)
    tokens = torch.randint(0, 12, (2, 5))  # (B, L)
    padded = asr.decode(tokens, memory, torch.tensor([9, 6]))
    alone = asr.decode(tokens[1:], memory[1:, :6])
    assert torch.allclose(padded[1:], alone, atol=1e-5)
    joined, index = memory_then_target(memory, torch.tensor([9, 6]), torch.ones(2, 5, 16))
    assert index.tolist() == [[9, 10, 11, 12, 13], [6, 7, 8, 9, 10]]
    assert torch.equal(joined[1, :6], memory[1, :6]) and torch.equal(joined[1, 11:], torch.zeros(3, 16))


def test_help_prints_usage(capsys):
    import train_asr

    with pytest.raises(SystemExit):
        run_asr_pretraining(["--help"], usage=train_asr.__doc__)
    assert "asr_checkpoint_folder" in capsys.readouterr().out

