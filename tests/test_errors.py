"""Every bad input of issue 2 fails early with a message that names the file, the problem and the fix."""
import pathlib

import numpy as np
import pytest
import soundfile
import torch

from modules.checkpoint import CheckpointMismatchError, load_reference_checkpoint, save_reference_checkpoint
from modules.model import load_inference_network, load_model_hparams
from modules.tokenizer import check_added_tokens, load_tokenizer
from src.audio import AudioError, load_audio


def test_missing_audio_file(tmp_path):
    with pytest.raises(AudioError, match=r"nope\.wav: audio file not found"):
        load_audio(tmp_path / "nope.wav")


def test_empty_audio_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav: the file is empty"):
        load_audio(path)


def test_wav_header_without_samples(tmp_path):
    path = tmp_path / "silent.wav"
    soundfile.write(path, np.zeros((0,), dtype=np.float32), 16000)
    with pytest.raises(AudioError, match=r"silent\.wav: the file holds no audio samples"):
        load_audio(path)


@pytest.mark.parametrize("content", [b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(256)) * 4,
                                     b"Meeting notes: bring the slides.\n"])  # broken header; text renamed .wav
def test_corrupt_audio_file(tmp_path, content):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError, match=r"corrupt\.wav: cannot be decoded as audio"):
        load_audio(path)


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(AudioError, match="is a folder"):
        load_audio(tmp_path)


def test_audio_shorter_than_one_adapter_position(tmp_path):
    path = tmp_path / "blip.wav"
    soundfile.write(path, np.full(1600, 0.1, dtype=np.float32), 16000)  # 100 ms
    with pytest.raises(AudioError, match=r"blip\.wav: audio is 100 ms long, shorter than 200 ms \(one adapter "
                                         r"position"):
        load_audio(path)


def test_short_after_resampling(tmp_path):
    path = tmp_path / "blip44.wav"
    soundfile.write(path, np.full(6000, 0.1, dtype=np.float32), 44100)  # 136 ms at 44.1 kHz
    with pytest.raises(AudioError, match="shorter than 200 ms"):
        load_audio(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_infinite_samples(tmp_path, bad):
    samples = np.full(8000, 0.1, dtype=np.float32)
    samples[100] = bad
    path = tmp_path / "nan.wav"
    soundfile.write(path, samples, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"nan\.wav: the audio contains NaN or infinite samples"):
        load_audio(path)


def test_checkpoint_for_the_wrong_vocabulary(tmp_path):
    stage12 = load_model_hparams(overrides={"num_state_tokens": 1})["model"]
    save_reference_checkpoint(stage12, tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"vocabulary: checkpoint has 50278 rows but this "
                                                      r"configuration needs 50280.*num_state_tokens: 1"):
        load_reference_checkpoint(load_model_hparams()["model"], tmp_path)


def test_corrupt_checkpoint_file(tmp_path):
    folder = tmp_path / "CKPT+2026-01-01+00-00-00+00"
    folder.mkdir()
    (folder / "model.ckpt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointMismatchError, match=r"model\.ckpt: damaged checkpoint, cannot be read") as error:
        load_reference_checkpoint(load_model_hparams()["model"], tmp_path)
    assert f"Delete the folder {folder} (rm -r)" in str(error.value)  # which folder, and what to do


def test_checkpoint_without_normalizer(tmp_path):
    net = load_model_hparams()
    save_reference_checkpoint(net["model"], tmp_path)
    with pytest.raises(FileNotFoundError, match=r"normalizer\.ckpt: normalizer statistics missing"):
        load_reference_checkpoint(net["model"], tmp_path, normalizer=net["normalizer"])


def test_checkpoint_with_untied_lm_head(tmp_path):
    net = load_model_hparams()
    folder = save_reference_checkpoint(net["model"], tmp_path)
    state = torch.load(folder / "model.ckpt", weights_only=True)
    state["3.model.lm_head.weight"] = state["3.model.lm_head.weight"].clone() + 1
    torch.save(state, folder / "model.ckpt")
    with pytest.raises(CheckpointMismatchError, match="differ, but the LM ties them"):
        load_reference_checkpoint(net["model"], tmp_path)


def test_tokenizer_without_the_added_tokens():
    plain = load_tokenizer(1)  # only <|endofuser|>
    with pytest.raises(ValueError, match=r"missing DuplexMamba's added tokens.*<\|ignore\|>.*load_tokenizer"):
        check_added_tokens(plain, 3)


def test_missing_model_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="model YAML not found"):
        load_model_hparams(tmp_path / "none.yaml")


TINY_INFERENCE_YAML = pathlib.Path(__file__).resolve().parents[1] / "duplex" / "duplex_tiny.yaml"
MODEL_YAML = TINY_INFERENCE_YAML.parents[1] / "hparams" / "model" / "tiny.yaml"


def _inference_yaml(tmp_path, replace_from, replace_to):
    """duplex_tiny.yaml with one edit, its `!include:` made absolute so it works from tmp_path."""
    text = TINY_INFERENCE_YAML.read_text().replace("!include:../hparams/model/tiny.yaml", f"!include:{MODEL_YAML}")
    assert replace_from in text
    path = tmp_path / "typo.yaml"
    path.write_text(text.replace(replace_from, replace_to, 1))
    return path


@pytest.mark.parametrize("replace_from, replace_to, message", [
    ("\nprecision: fp32", "\nprecison: fp32", r"typo\.yaml: unknown top-level key\(s\) \['precison'\]"),
    ("    num_state_tokens: 3", "    num_state_token: 3",
     r"typo\.yaml: `net:` overrides key\(s\) \['num_state_token'\] that tiny\.yaml does not define"),
])
def test_inference_yaml_with_a_misspelt_key(tmp_path, replace_from, replace_to, message):
    """hyperpyyaml keeps unknown keys silently; a typo must not quietly fall back to a default."""
    with pytest.raises(ValueError, match=message):
        load_inference_network(_inference_yaml(tmp_path, replace_from, replace_to))


def test_generator_block_with_a_misspelt_key():
    from CustomGenerator import GenerationOptions

    block = {key: 1 for key in GenerationOptions.KEYS if key != "reply_top_k"} | {"reply_topk": 50}
    with pytest.raises(ValueError, match=r"my\.yaml: generator block: missing \['reply_top_k'\], unknown "
                                         r"\['reply_topk'\]"):
        GenerationOptions.from_yaml(block, source="my.yaml")
    with pytest.raises(ValueError, match=r"my\.yaml: needs a `generator:` block"):
        GenerationOptions.from_yaml(None, source="my.yaml")
    good = {key: 1 for key in GenerationOptions.KEYS} | {"state_top_p": 0.7, "reply_top_p": 0.7}
    for key, value in (("state_temperature", "0.9"), ("reply_top_p", 1.5), ("max_new_tokens", "many")):
        with pytest.raises(ValueError, match=r"my\.yaml: generator block: "):
            GenerationOptions.from_yaml(good | {key: value}, source="my.yaml")
    assert GenerationOptions.from_yaml(good, source="my.yaml").max_new_tokens == 1
