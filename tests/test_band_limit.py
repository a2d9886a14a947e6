"""scripts/band_limit.py: a manifest's audio through an 8 kHz line, beside the untouched rows."""
import csv
import importlib.util
import pathlib

import numpy as np
import pytest
import soundfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("band_limit", ROOT / "scripts" / "band_limit.py")
band_limit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(band_limit)

RATE = 16000


def _tone_power(audio, hz):
    spectrum = np.abs(np.fft.rfft(audio)) ** 2
    return spectrum[int(round(hz * len(audio) / RATE))]


def _corpus(folder):
    t = np.arange(RATE) / RATE
    audio = 0.3 * np.sin(2 * np.pi * 1000 * t) + 0.3 * np.sin(2 * np.pi * 6000 * t)  # one in band, one above
    (folder / "test" / "a").mkdir(parents=True)
    soundfile.write(folder / "test" / "a" / "x.flac", audio, RATE)
    soundfile.write(folder / "test" / "a" / "y.flac", audio[: RATE // 2], RATE)
    with open(folder / "test-asr.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["ID", "duration", "wav", "wrd"])
        writer.writerow(["x", "1.0", "test/a/x.flac", "one"])
        writer.writerow(["y", "0.5", "test/a/y.flac", "two"])
    return audio


def test_the_upper_band_is_gone_the_lower_kept_and_both_manifests_point_at_their_audio(tmp_path):
    audio = _corpus(tmp_path / "corpus")
    assert band_limit.main([str(tmp_path / "corpus" / "test-asr.csv"), str(tmp_path / "out"), "--rows", "1"]) == 0
    narrow, rate = soundfile.read(tmp_path / "out" / "test" / "a" / "x.flac")
    assert rate == RATE and len(narrow) == len(audio)
    assert _tone_power(narrow, 1000) == pytest.approx(_tone_power(audio, 1000), rel=0.05)
    assert _tone_power(narrow, 6000) < 1e-4 * _tone_power(audio, 6000)
    for name, expected in (("test-asr.csv", tmp_path / "out"), ("original-test-asr.csv", tmp_path / "corpus")):
        rows = list(csv.DictReader(open(tmp_path / "out" / name)))
        assert [row["ID"] for row in rows] == ["x"]  # --rows 1
        assert ((tmp_path / "out" / rows[0]["wav"]).resolve() == (expected / "test/a/x.flac").resolve())


def test_writing_over_the_corpus_is_refused(tmp_path):
    _corpus(tmp_path / "corpus")
    with pytest.raises(SystemExit, match="manifest's own folder"):
        band_limit.main([str(tmp_path / "corpus" / "test-asr.csv"), str(tmp_path / "corpus")])
    assert soundfile.read(tmp_path / "corpus" / "test" / "a" / "x.flac")[0].std() > 0.2  # untouched


def test_an_unreadable_file_is_named_and_no_manifest_is_written(tmp_path):
    _corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "test" / "a" / "y.flac").write_bytes(b"not audio")
    with pytest.raises(SystemExit, match=r"y\.flac.*no manifest was written"):
        band_limit.main([str(tmp_path / "corpus" / "test-asr.csv"), str(tmp_path / "out")])
    assert not (tmp_path / "out" / "test-asr.csv").exists()
