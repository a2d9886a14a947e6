"""Random gain for training: each waveform of a batch scaled by its own level change, log-uniform in decibels.

Why: the synthetic corpus renders every utterance with a peak of -6 to -1 dBFS (src/corpus/plan.py), and log-mel
features shift with the level (the global feature normalisation does not undo a per-utterance gain), so a model
trained on it meets quieter or louder speech, a real microphone's, at levels it never saw. The paper's recipe
(hparams/S2S) has no such augmentation; the recipes for synthetic data (hparams/speedrun, hparams/demo) turn it on
with the YAML key `gain_perturb`.
"""
import torch


class RandomGain(torch.nn.Module):
    """(B, N) waveforms -> the same scaled by 10^(g/20) per row, g uniform in [min_db, max_db].

    The gains are drawn on the CPU from torch's global generator (whose state the training checkpoints keep:
    src/run_control.py), so a run gives the same gains on any device and after a resume.
    """

    def __init__(self, min_db: float = -30.0, max_db: float = 0.0):
        super().__init__()
        if not min_db <= max_db:
            raise ValueError(f"RandomGain: min_db ({min_db}) must not exceed max_db ({max_db})")
        self.min_db, self.max_db = float(min_db), float(max_db)

    def forward(self, wavs: torch.Tensor) -> torch.Tensor:
        decibels = torch.empty(wavs.shape[0], 1).uniform_(self.min_db, self.max_db)  # (B, 1)
        return wavs * torch.pow(10.0, decibels / 20.0).to(device=wavs.device, dtype=wavs.dtype)  # (B, N)
