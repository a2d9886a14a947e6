"""Which gate tells speech from silence best: the server's energy gate (with and without the DC fix) or silero-vad.

    python bench/vad_gate.py                      # energy gates only (the repository's venv)
    python bench/vad_gate.py --silero             # also silero-vad (pip install silero-vad onnxruntime)

Speech: every 3 s slice of example/*.wav and tests/data/corpus (a last piece of at least 1 s counts), as
recorded, riding on a -40 dBFS DC offset, and turned down to -40 dBFS RMS (a quiet talker). Not speech:
digital silence, DC offsets, white noise and 50 Hz hum at microphone-room levels, and DC plus noise. A gate
is right on a slice when it says speech for speech and silence for the rest. Writes
bench/results/vad_gate.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from duplex.server import gate_slice, rms_dbfs  # noqa: E402
from src.audio import load_audio  # noqa: E402

RATE = 16000
SLICE = 3 * RATE


def level(db: float) -> float:
    return 10 ** (db / 20)


def speech_slices() -> list[tuple[str, torch.Tensor]]:
    files = sorted(ROOT.glob("example/*.wav")) + sorted((ROOT / "tests/data/corpus").rglob("*.flac"))
    out = []
    for path in files:
        wav = load_audio(path)  # (N,) 16 kHz
        for start in range(0, wav.numel(), SLICE):
            piece = wav[start:start + SLICE]
            if piece.numel() >= RATE:
                out.append((f"{path.name}@{start // RATE}s", piece))
    variants = []
    for name, piece in out:
        variants.append((name, piece))
        variants.append((name + "+dc-40", piece + level(-40)))
        rms = piece.pow(2).mean().sqrt()
        if rms > 0:
            variants.append((name + "@-40dBFS", piece * (level(-40) / rms)))
    return variants


def silent_slices() -> list[tuple[str, torch.Tensor]]:
    t = torch.arange(SLICE) / RATE
    out = [("digital silence", torch.zeros(SLICE))]
    for db in (-40, -30, -20):
        out.append((f"dc {db} dBFS", torch.full((SLICE,), level(db))))
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        for db in (-70, -60, -50):
            out.append((f"white noise {db} dBFS #{seed}", level(db) * torch.randn(SLICE, generator=g)))
        out.append((f"dc -30 + noise -60 #{seed}", level(-30) + level(-60) * torch.randn(SLICE, generator=g)))
    for db in (-50, -40):
        out.append((f"50 Hz hum {db} dBFS", level(db) * math.sqrt(2) * torch.sin(2 * math.pi * 50 * t)))
    return out


def energy_gate(dc_removed: bool, threshold: float = -45.0):
    if dc_removed:
        return lambda wav: gate_slice(wav, RATE, threshold) is not None
    return lambda wav: rms_dbfs(wav) >= threshold  # the gate before the fix


def silero_gate():
    from silero_vad import get_speech_timestamps, load_silero_vad
    model = load_silero_vad(onnx=True)
    return lambda wav: bool(get_speech_timestamps(wav, model, sampling_rate=RATE))


def measure(gate, speech, silence) -> dict:
    began = time.perf_counter()
    speech_hits = [gate(wav) for _, wav in speech]
    silence_hits = [gate(wav) for _, wav in silence]
    seconds = time.perf_counter() - began
    return {
        "speech_recall": sum(speech_hits) / len(speech_hits),
        "silence_rejected": 1 - sum(silence_hits) / len(silence_hits),
        "missed_speech": [name for (name, _), hit in zip(speech, speech_hits) if not hit],
        "false_speech": [name for (name, _), hit in zip(silence, silence_hits) if hit],
        "ms_per_slice": 1000 * seconds / (len(speech) + len(silence)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--silero", action="store_true", help="also measure silero-vad (ONNX, onnxruntime)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/vad_gate.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    speech, silence = speech_slices(), silent_slices()
    gates = {"energy -45 dBFS (before: DC counts)": energy_gate(False),
             "energy -45 dBFS, DC removed (server now)": energy_gate(True)}
    if args.silero:
        gates["silero-vad 5 (ONNX, threshold 0.5)"] = silero_gate()
    results = {name: measure(gate, speech, silence) for name, gate in gates.items()}
    report = {"speech_slices": len(speech), "silent_slices": len(silence), "gates": results}
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"{len(speech)} speech slices, {len(silence)} non-speech slices (3 s)\n")
    print("| gate | speech kept | non-speech rejected | ms per slice | missed / false |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        wrong = r["missed_speech"][:3] + r["false_speech"][:3]
        print(f"| {name} | {r['speech_recall']:.3f} | {r['silence_rejected']:.3f} | {r['ms_per_slice']:.2f} | "
              f"{len(r['missed_speech'])} / {len(r['false_speech'])}: {', '.join(wrong)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
