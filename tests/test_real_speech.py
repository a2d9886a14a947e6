"""src.real_speech: the recorded channel names of alsa-utils as a manifest that src.evaluate reads."""
import numpy as np
import pytest
import soundfile

from src import evaluate, real_speech


def fake_alsa_root(root):
    folder = root / real_speech.ALSA_SOUNDS
    folder.mkdir(parents=True)
    t = np.arange(int(48000 * 1.2)) / 48000
    tone = 0.3 * np.sin(2 * np.pi * 220 * t)
    soundfile.write(folder / "Front_Left.wav", np.stack([tone, tone], axis=1), 48000)  # 48 kHz stereo, as shipped
    soundfile.write(folder / "Noise.wav", np.random.default_rng(0).normal(0, 0.1, 48000), 48000)
    return root


def test_manifest_of_the_recordings_is_read_by_evaluate_with_every_metric(tmp_path):
    manifest = real_speech.build(fake_alsa_root(tmp_path / "root"), tmp_path / "out")
    (row,) = evaluate.read_manifest(manifest, evaluate.METRICS)  # Noise.wav is not speech: left out
    assert row.utt_id == "real-front_left" and row.words == "front left" and row.task == "asr"
    audio, rate = soundfile.read(row.wav)
    assert rate == 16000 and audio.ndim == 1 and abs(len(audio) / 16000 - 1.2) < 0.01


def test_a_root_without_the_recordings_says_how_to_get_them(tmp_path, capsys):
    assert real_speech.main(["--root", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "apt-get install alsa-utils" in capsys.readouterr().err
    with pytest.raises(real_speech.RealSpeechError):
        real_speech.recordings(tmp_path)
