"""src.real_speech: real recordings (alsa-utils, asterisk prompts) as manifests that src.evaluate reads."""
import gzip

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


def test_a_root_without_any_source_says_how_to_get_both(tmp_path, capsys):
    assert real_speech.main(["--root", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "apt-get install alsa-utils" in error and "asterisk-core-sounds-en-wav" in error
    assert not (tmp_path / "out").exists()  # nothing written


def fake_asterisk_root(root):
    """The layout of asterisk-core-sounds-en(-wav): 8 kHz prompts in en_US_f_Allison/, transcripts in a .txt.gz."""
    voice = root / real_speech.ASTERISK_SOUNDS / "en_US_f_Allison"
    (voice / "digits").mkdir(parents=True)
    t = np.arange(int(8000 * 0.9)) / 8000
    tone = 0.3 * np.sin(2 * np.pi * 300 * t)
    for name in ("dictate/both_help", "digits/5", "letters/at", "beep", "unlisted", "too-short"):
        (voice / name).parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(voice / f"{name}.wav", tone[:400] if name == "too-short" else tone, 8000)
    (voice / "digits" / "5.g722").write_bytes(b"not read")  # the 16 kHz codec copy: only the .wav is read
    (root / real_speech.ASTERISK_SOUNDS / "en").symlink_to(voice)  # the package's alias: not read twice
    transcripts = root / real_speech.ASTERISK_TRANSCRIPTS
    transcripts.parent.mkdir(parents=True)
    with gzip.open(transcripts, "wt") as stream:
        stream.write("; Core Asterisk Sounds in English\n\n"
                     "dictate/both_help: press * to toggle pause, press # to enter a new dictation filename\n"
                     "digits/5: five\nletters/at: at [@]\nbeep: [this is a simple beep tone]\n"
                     "too-short: Press 1.\nsilence/1: (1 second of silence)\n")
    return root


def test_the_asterisk_prompts_become_a_manifest_of_their_own_beside_alsa(tmp_path):
    root = fake_asterisk_root(fake_alsa_root(tmp_path / "root"))
    said = []
    manifest = real_speech.build(root, tmp_path / "out", log=said.append)
    rows = evaluate.read_manifest(manifest, evaluate.METRICS)
    assert {row.utt_id: row.words for row in rows} == {
        "real-front_left": "front left",
        "asterisk-dictate_both_help": "press star to toggle pause press pound to enter a new dictation filename",
        "asterisk-digits_5": "five", "asterisk-letters_at": "at"}
    by_source = {source: [row.utt_id for row in evaluate.read_manifest(tmp_path / "out" / f"real-{source}.csv",
                                                                         evaluate.METRICS)]
                 for source in ("alsa", "asterisk")}
    assert by_source["alsa"] == ["real-front_left"] and len(by_source["asterisk"]) == 3
    audio, rate = soundfile.read(tmp_path / "out" / "audio" / "asterisk-digits_5.flac")
    assert rate == 16000 and abs(len(audio) / 16000 - 0.9) < 0.01  # 8 kHz read at 16 kHz
    assert "real speech: asterisk: 3 recordings, 15 words" in "\n".join(said)
    assert "2 files left out, not speech or without a transcript" in "\n".join(said)  # beep, unlisted
    assert any("1 unreadable or too short, left out: too-short.wav" in line for line in said)


@pytest.mark.parametrize("line, words", [
    ("[ascending tones]", None), ("<beep ascending>", None), ("(10 seconds of silence)", None),
    ("dot [.]", "dot"), ("Press 1 for help.", "press one for help"), ("exclaimation-point [!]", "exclamation point"),
    ("Enter a filename followed by # or just # to exit", "enter a filename followed by pound or just pound to exit"),
])
def test_prompt_transcripts_are_normalised_as_the_corpus_and_non_speech_is_dropped(line, words):
    assert real_speech.spoken_prompt(line) == words


def test_only_the_asterisk_prompts_are_enough(tmp_path):
    manifest = real_speech.build(fake_asterisk_root(tmp_path / "root"), tmp_path / "out", log=lambda line: None)
    assert len(evaluate.read_manifest(manifest, evaluate.METRICS)) == 3
    assert not (tmp_path / "out" / "real-alsa.csv").exists()
