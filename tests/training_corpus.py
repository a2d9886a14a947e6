"""A handful of synthetic utterances in LibriSpeech layout for the training tests (no speech needed).

Each utterance is a short tone + noise mix whose pitch depends on its index, so that different utterances are
distinguishable to the encoder; texts follow the corpus conventions of docs/corpus.md.
"""
import numpy as np
import soundfile

SAMPLE_RATE = 16000
UTTERANCES = (  # (chapter, utterance id, transcript, response or None)
    ("0", "asr-100-0-0000", "the cat sat", None),
    ("0", "asr-100-0-0001", "a dog ran far", None),
    ("1", "100-1-0002", "what is two plus two", "Two plus two is four."),
    ("3", "100-3-0003-cut", "what is the", "It seems like your question got cut off."),
    ("4", "100-4-0004-ignore", "nice weather today", "I didn't get that, could you rephrase it?"),
)


def tone(index, seconds):
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    rng = np.random.default_rng(index)
    wave = 0.3 * np.sin(2 * np.pi * (200 + 90 * index) * t) + 0.02 * rng.standard_normal(t.shape)
    return wave.astype(np.float32)


def write_corpus(root, splits=("train", "valid", "test"), seconds=1.2):
    """Write every utterance into each split folder (tiny overfitting data); returns `root`."""
    for split in splits:
        for index, (chapter, utt_id, transcript, response) in enumerate(UTTERANCES):
            folder = root / split / "100" / chapter
            folder.mkdir(parents=True, exist_ok=True)
            soundfile.write(str(folder / f"{utt_id}.flac"), tone(index, seconds + 0.1 * index), SAMPLE_RATE)
            with open(folder / f"100-{chapter}.trans.txt", "a") as handle:
                handle.write(f"{utt_id} {transcript}\n")
            if response is not None:
                with open(folder / f"100-{chapter}.response.txt", "a") as handle:
                    handle.write(f"{utt_id} {response}\n")
    return root
