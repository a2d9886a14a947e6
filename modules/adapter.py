"""Speech adapter: concatenate k consecutive encoder frames and project them to the LM width.

With k = 5 and 40 ms encoder frames, one LM position covers 200 ms of speech; a 3 s slice gives
76 encoder frames -> 15 positions (the last T mod k frames are dropped, as the reference does).
"""
import torch  # noqa: F401 (the docstring example runs in this module's namespace)
import torch.nn as nn


class SpeechAdapter(nn.Module):
    """k-frame concat -> Linear -> ReLU -> Linear (keys ``linear1``, ``linear2``).

    Parameters
    ----------
    k : int
        Encoder frames per LM position.
    encoder_dim, hidden_dim, lm_dim : int
        Encoder width, hidden width and LM embedding width (reference 512, 1024, 2560).

    Example
    -------
    >>> adapter = SpeechAdapter(k=5, encoder_dim=8, hidden_dim=16, lm_dim=12)
    >>> adapter(torch.randn(2, 76, 8)).shape
    torch.Size([2, 15, 12])
    >>> adapter(torch.randn(1, 3, 8)).shape
    torch.Size([1, 0, 12])
    """

    def __init__(self, k=5, encoder_dim=512, hidden_dim=1024, lm_dim=2560):
        super().__init__()
        if k < 1:
            raise ValueError(f"SpeechAdapter: k must be a positive number of frames per position; got {k}.")
        self.k, self.encoder_dim, self.lm_dim = k, encoder_dim, lm_dim
        self.linear1 = nn.Linear(k * encoder_dim, hidden_dim)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(hidden_dim, lm_dim)

    def output_lengths(self, encoder_lengths):
        """LM positions produced from ``encoder_lengths`` frames (int or int tensor): floor division by k."""
        return encoder_lengths // self.k

    def forward(self, x):
        """(B, T, encoder_dim) -> (B, T // k, lm_dim); T < k gives zero positions, not an error."""
        if x.dim() != 3 or x.shape[-1] != self.encoder_dim:
            raise ValueError(f"SpeechAdapter expects (B, T, {self.encoder_dim}) encoder frames; "
                             f"got {tuple(x.shape)}.")
        batch, frames, _ = x.shape
        positions = self.output_lengths(frames)
        x = x[:, : positions * self.k]  # (B, P*k, D): drop the T mod k remainder
        x = x.reshape(batch, positions, self.k * self.encoder_dim)  # (B, P, k*D), frame-major within a window
        return self.linear2(self.relu(self.linear1(x)))  # (B, P, lm_dim)
