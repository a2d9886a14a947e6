"""The full-size stage YAMLs resolve and carry the paper's Table 5 settings (built at tiny size: the model
include is pointed at hparams/model/tiny.yaml so no 2.8B LM is instantiated)."""
import pathlib

import pytest
import torch
from hyperpyyaml import load_hyperpyyaml

from src.brain import check_part_lists

ROOT = pathlib.Path(__file__).resolve().parents[1]
TABLE5 = {  # stage: (lr, paper warmup, grad accumulation, epochs, trained parts)
    1: (2.5e-4, 30000, 8, 7, {"cnn", "encoder", "adapter", "normalizer"}),
    2: (5e-5, 20000, 8, 2, {"adapter", "lm"}),
    3: (3e-5, 15000, 8, 3, {"adapter", "lm"}),
    4: (4e-5, 30000, 128, 2, {"cnn", "encoder", "adapter"}),
}
BATCHING = {1: (300, 80), 2: (200, 4), 3: (200, 5), 4: None}  # spec §3: seconds, examples; stage 4 batch 1
SELECTION = {1: ("ACC", "max"), 2: ("PPL", "min"), 3: ("PPL", "min"), 4: ("PPL", "min")}


def load_full_yaml_at_tiny_size(stage, tmp_path):
    text = (ROOT / "hparams" / "S2S" / f"train_stage{stage}.yaml").read_text()
    assert "!include:../model/full.yaml" in text, "the model must be included, not copied"
    text = text.replace("!include:../model/full.yaml", f"!include:{ROOT / 'hparams' / 'model' / 'tiny.yaml'}")
    path = tmp_path / f"stage{stage}.yaml"
    path.write_text(text)
    overrides = {"data_folder": str(tmp_path), "output_folder": str(tmp_path / "out")}
    if stage == 1:
        overrides.update(lm_source=None, asr_checkpoint_folder=str(tmp_path / "asr"))
    with open(path) as handle:
        return load_hyperpyyaml(handle, overrides)


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_full_yaml_has_table5_settings(stage, tmp_path):
    hparams = load_full_yaml_at_tiny_size(stage, tmp_path)
    lr, paper_warmup, accumulation, epochs, trained = TABLE5[stage]
    assert hparams["stage"] == stage
    assert hparams["lr_peak"] == pytest.approx(lr)
    assert hparams["grad_accumulation_factor"] == accumulation
    assert hparams["noam_annealing"].n_warmup_steps == paper_warmup // accumulation
    assert hparams["epoch_counter"].limit == epochs
    assert hparams["precision"] == "bf16" and hparams["max_grad_norm"] == 5.0
    assert hparams["speed_perturb"].speeds == [95, 100, 105]
    assert set(hparams["trained_modules"]) == trained
    check_part_lists(hparams["trained_modules"], hparams["frozen_modules"])
    assert hparams["loss_mode"] == "paper"
    rows = hparams["model"].lm.model.get_input_embeddings().weight.shape[0]
    assert rows == (50278 if stage <= 2 else 50280)
    assert hparams["init_from"].get("grow_vocabulary", False) == (stage == 3)
    assert (hparams["modules"]["duplex"].segment_seconds == 3.0) == (stage == 4)
    assert hparams["modules"]["duplex"].slice_split is None  # the paper's recipe: whole utterances only


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_full_yaml_has_spec_optimiser_batching_and_selection(stage, tmp_path):
    """Spec §3's common settings: AdamW (0.9, 0.98, 1e-9, wd 0.01) at the peak lr, label smoothing 0.1, dynamic
    batching by duration (stage 4: batch 1), 20 checkpoints kept, the reference's checkpoint selection."""
    hparams = load_full_yaml_at_tiny_size(stage, tmp_path)
    adamw = hparams["opt_class"]
    assert adamw.func.__name__ == "AdamW"
    assert adamw.keywords == {"lr": TABLE5[stage][0], "betas": (0.9, 0.98), "eps": 1e-9, "weight_decay": 0.01}
    assert hparams["label_smoothing"] == 0.1
    assert hparams["keep_checkpoints"] == 20
    assert (hparams["selection_key"], hparams["selection_mode"]) == SELECTION[stage]
    sampler = hparams["train_batch_sampler"]
    if BATCHING[stage] is None:
        assert sampler is None and hparams["train_dataloader_opts"]["batch_size"] == 1
    else:
        assert (sampler["max_batch_length"], sampler["max_batch_ex"]) == BATCHING[stage]
        assert sampler["shuffle"] and hparams["valid_batch_sampler"]["max_batch_length"] == 100


@pytest.mark.parametrize("trained,frozen,complaint", [
    (["cnn", "encoder", "adapter", "normalizer"], [], "missing ['lm']"),
    (["cnn", "encoder", "adapter", "normalizer", "lm"], ["lm"], "listed twice ['lm']"),
    (["cnn", "encoder", "adaptor", "normalizer"], ["lm"], "unknown ['adaptor']"),
])
def test_trained_and_frozen_lists_must_cover_every_part_once(trained, frozen, complaint):
    with pytest.raises(ValueError, match=complaint.replace("[", r"\[").replace("]", r"\]")):
        check_part_lists(trained, frozen)


def test_unknown_init_from_key_is_refused():
    from src.handoff import load_previous_stage
    with pytest.raises(ValueError, match="grow_vocab"):
        load_previous_stage({"folder": None, "grow_vocab": True}, model=None, normalizer=None)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_dynamic_batching_options_build_a_sampler(stage, tmp_path):
    from src.stages import loader_kwargs, read_manifest
    hparams = load_full_yaml_at_tiny_size(stage, tmp_path)
    dataset = read_manifest(ROOT / "tests" / "data" / "corpus" / "train.csv")
    for name in ("train", "valid"):
        sampler = loader_kwargs(hparams, dataset, name)["batch_sampler"]
        batches = list(sampler)
        assert sorted(i for batch in batches for i in batch) == list(range(len(dataset)))


def yaml_keys(path):
    return {line.split(":")[0] for line in path.read_text().splitlines() if line[:1].isalpha() and ":" in line}


def test_every_stage_yaml_key_is_used():
    """Port of SpeechBrain's check_yaml_vs_script: a key nobody reads is dead configuration."""
    code = "".join((ROOT / path).read_text() for path in ("src/brain.py", "src/stages.py", "src/handoff.py"))
    run_options = {"precision", "grad_accumulation_factor", "max_grad_norm"}  # read by speechbrain.Brain
    for path in sorted((ROOT / "hparams").glob("*/train_stage*.yaml")):
        text = path.read_text()
        for key in yaml_keys(path) - run_options:
            used = f"<{key}" in text or f".{key}" in code or f'"{key}"' in code
            used = used or (key.endswith(("_dataloader_opts", "_batch_sampler")) and "f\"{name}_" in code)
            assert used, f"{path.relative_to(ROOT)}: key {key!r} is read by no code"


def test_random_gain_draws_a_level_per_row_in_its_range_and_repeats_with_the_seed():
    from src.gain import RandomGain
    wavs = torch.ones(64, 100)  # (B, N)
    wavs[:, 80:] = 0.0  # padding
    torch.manual_seed(3)
    scaled = RandomGain(-30.0, 0.0)(wavs)
    decibels = 20 * torch.log10(scaled[:, 0])
    assert decibels.min() >= -30.0 - 1e-4 and decibels.max() <= 1e-4 and decibels.std() > 5.0
    assert torch.equal(scaled[:, 80:], torch.zeros(64, 20))  # padding stays silent
    assert torch.all(scaled[:, :80] == scaled[:, :1])  # one gain per row
    torch.manual_seed(3)
    assert torch.equal(RandomGain(-30.0, 0.0)(wavs), scaled)
    with pytest.raises(ValueError, match="must not exceed"):
        RandomGain(0.0, -30.0)


def test_every_training_yaml_declares_its_level_augmentation():
    """`gain_perturb` is a key of every recipe that has `speed_perturb` (the Brains read it): on for the speedrun's
    synthetic data, off for the paper's recipe and the tiny test recipes."""
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1] / "hparams"
    recipes = [p for p in root.rglob("*.yaml") if "\nspeed_perturb:" in p.read_text()]
    assert len(recipes) >= 20
    assert all("\ngain_perturb:" in p.read_text() for p in recipes)
    assert all("\ngain_perturb: !new:src.gain.RandomGain" in (root / "speedrun" / name).read_text()
               for name in ("asr.yaml", "train_stage1.yaml", "train_stage2.yaml", "train_stage3.yaml",
                            "train_stage4.yaml"))
    assert "\ngain_perturb: null" in (root / "S2S" / "train_stage1.yaml").read_text()
