"""The one speech encode path: wav -> Fbank -> global normalisation -> CNN -> ConMamba -> adapter.

Frame arithmetic (16 kHz, hop 160, two stride-2 CNN blocks, k = 5):
3 s = 48000 samples -> 301 fbank frames -> 76 encoder frames -> 15 LM positions.

The reference kept every module in training mode at inference, so its normaliser kept folding each
new slice into the running statistics (and dropout stayed on). Here the normaliser only updates in
training mode with ``epoch < update_until_epoch``; in eval mode the statistics are read-only.
"""
import warnings

import torch
import torch.nn as nn
from speechbrain.lobes.features import Fbank
from speechbrain.lobes.models.convolution import ConvolutionFrontEnd
from speechbrain.processing.features import InputNormalization

from modules.adapter import SpeechAdapter
from modules.conmamba import ConMambaASR

SAMPLE_RATE = 16000
HOP_SAMPLES = 160  # 10 ms fbank hop
CNN_TIME_STRIDE = 4  # two stride-2 conv blocks


def fbank_frames(num_samples):
    """Fbank frames of ``num_samples`` samples (centred STFT): 1 + N // hop. Works on ints and int tensors."""
    return 1 + num_samples // HOP_SAMPLES


def cnn_frames(num_fbank_frames):
    """Encoder frames after the CNN: ceil(ceil(T / 2) / 2) = ceil(T / 4)."""
    return -(-num_fbank_frames // CNN_TIME_STRIDE)


def speech_positions(num_samples, k=5):
    """LM positions for ``num_samples`` of 16 kHz audio: 48000 -> 301 -> 76 -> 15."""
    return cnn_frames(fbank_frames(num_samples)) // k


def frames_per_position(k=5):
    """Fbank frames (10 ms each) covered by one LM position: 4 * k (= 20, i.e. 200 ms, for k = 5)."""
    return CNN_TIME_STRIDE * k


def reference_fbank():
    """SpeechBrain Fbank with the reference settings (n_fft 512, 32 ms window, 10 ms hop, 80 mels).

    SpeechBrain's own defaults (n_fft 400, 25 ms window) differ, so the settings are spelled out.
    """
    return Fbank(sample_rate=SAMPLE_RATE, n_fft=512, win_length=32, hop_length=10, n_mels=80)


def reference_cnn():
    """SpeechBrain ConvolutionFrontEnd of the reference: 2 blocks, (64, 32) channels, 3x3, stride 2."""
    return ConvolutionFrontEnd(input_shape=(8, 10, 80), num_blocks=2, num_layers_per_block=1,
                               out_channels=(64, 32), kernel_sizes=(3, 3), strides=(2, 2),
                               residuals=(False, False))


class GlobalNormalization(InputNormalization):
    """SpeechBrain global ``InputNormalization`` that is safe to use at inference.

    Same statistics, update rule and checkpoint format (``normalizer.ckpt``) as SpeechBrain; in addition
    the statistics follow the input's device, and in eval mode without any statistics (nothing loaded,
    never trained) it normalises with mean 0 / std 1 and warns instead of crashing.
    """

    def __init__(self, update_until_epoch=4):
        super().__init__(norm_type="global", update_until_epoch=update_until_epoch)

    def forward(self, x, lengths=None, epoch=None):
        """(B, T, F) -> (B, T, F); updates the running stats only in train mode with epoch < limit."""
        if self.count == 0 and not self._should_update(epoch):
            warnings.warn("GlobalNormalization has no statistics (load normalizer.ckpt or train first): "
                          "features are passed through un-normalised.")
            return x
        self.glob_mean = self.glob_mean.to(x.device)
        self.glob_std = self.glob_std.to(x.device)
        return super().forward(x, lengths, epoch=epoch)


class SpeechEncoder(nn.Module):
    """wav (16 kHz) -> LM input embeddings, the single encode path for training and inference.

    Parameters
    ----------
    compute_features : nn.Module
        (B, N) wav -> (B, T, 80) log-mel features (``reference_fbank()``).
    normalizer : InputNormalization
        Global feature normalisation (``GlobalNormalization``).
    cnn : nn.Module
        (B, T, 80) -> (B, ceil(T/4), 20, 32) front-end (``reference_cnn()``).
    encoder : ConMambaASR
        (B, T', 640) -> (B, T', d_model).
    adapter : SpeechAdapter
        (B, T', d_model) -> (B, T' // k, lm_dim).
    """

    def __init__(self, compute_features, normalizer, cnn, encoder, adapter):
        super().__init__()
        self.compute_features = compute_features
        self.normalizer = normalizer
        self.cnn = cnn
        self.encoder = encoder
        self.adapter = adapter

    def output_lengths(self, num_samples):
        """LM positions produced from ``num_samples`` samples (int or int tensor)."""
        return self.adapter.output_lengths(cnn_frames(fbank_frames(num_samples)))

    def forward(self, wavs, wav_lens, epoch=None):
        """Encode a padded batch of waveforms.

        Parameters
        ----------
        wavs : torch.Tensor
            (B, N) float 16 kHz audio, right-padded.
        wav_lens : torch.Tensor
            (B,) relative lengths in (0, 1] (SpeechBrain convention).
        epoch : int, optional
            Current epoch, gates the normaliser's updates in training mode (``update_until_epoch``).

        Returns
        -------
        embeds : torch.Tensor
            (B, P, lm_dim) speech embeddings; P may be 0 for very short input.
        lengths : torch.Tensor
            (B,) int64 valid positions per row.
        """
        _check_wavs(wavs, wav_lens)
        wav_lens = wav_lens.to(wavs.device)
        num_samples = torch.round(wav_lens.float() * wavs.shape[1]).long()  # (B,)
        encoder_lengths = cnn_frames(fbank_frames(num_samples))  # (B,)
        embeds = self._encode(wavs, wav_lens, encoder_lengths, epoch)  # (B, P, lm_dim)
        return embeds, self.adapter.output_lengths(encoder_lengths)

    def encode_wav(self, wav):
        """(N,) wav -> (1, P, lm_dim) embeddings (inference convenience; P may be 0).

        Host-sync free (no length bookkeeping), so it can run inside a CUDA graph capture.
        """
        if wav.dim() != 1 or wav.shape[0] == 0:
            raise ValueError(f"SpeechEncoder.encode_wav expects a mono (N,) waveform with N > 0; got "
                             f"{tuple(wav.shape)}. Use forward() for batches; downmix multi-channel audio "
                             "first (src/audio.py).")
        return self._encode(wav.unsqueeze(0), None, None, epoch=None)  # (1, P, lm_dim)

    def encode_pieces(self, pieces, epoch=None):
        """1-D waveforms -> their encoder frames, [(T'_i, d_model)], each exactly as if encoded alone.

        Why: stage 4 hears every utterance as independent ~3 s segments, a hundred or more per batch; encoding
        them one by one made it 10x slower per step than stage 3. The front-end (fbank, normaliser, CNN) is cheap
        and runs piece by piece, since its 2-D convolutions would see a padded neighbour's frames; the ConMamba
        stack, nearly all of the work, runs once over the padded pieces with their lengths, which it honours
        exactly (BiMamba's backward start, the padding-aware depthwise convolution).
        """
        full = torch.ones(1, device=pieces[0].device)
        fronts = [self.cnn(self.normalizer(self.compute_features(piece.unsqueeze(0)), full, epoch=epoch))[0]
                  .flatten(start_dim=1) for piece in pieces]  # [(T'_i, F*C)]
        lengths = torch.tensor([front.shape[0] for front in fronts], device=pieces[0].device)  # (S,)
        encoded = self.encoder(nn.utils.rnn.pad_sequence(fronts, batch_first=True), lengths=lengths)  # (S, T', D)
        return [frames[:length] for frames, length in zip(encoded, lengths.tolist())]

    def _encode(self, wavs, wav_lens, encoder_lengths, epoch):
        """The shared pipeline; ``wav_lens``/``encoder_lengths`` None mean every row is full length."""
        if self.output_lengths(wavs.shape[1]) == 0:  # too short for one position: skip the CNN's padding
            return wavs.new_zeros(wavs.shape[0], 0, self.adapter.lm_dim)
        feats = self.compute_features(wavs)  # (B, T, 80)
        feats = self.normalizer(feats, wav_lens, epoch=epoch)  # (B, T, 80)
        encoded = self.encoder(self.cnn(feats), lengths=encoder_lengths)  # (B, T', d_model)
        return self.adapter(encoded)  # (B, P, lm_dim)


def _check_wavs(wavs, wav_lens):
    """Reject inputs that would fail deep inside the encoder with an unreadable error."""
    if wavs.dim() != 2 or wavs.shape[1] == 0:
        raise ValueError(f"SpeechEncoder expects (B, N) 16 kHz waveforms with N > 0; got {tuple(wavs.shape)}.")
    if not wavs.is_floating_point():
        raise ValueError(f"SpeechEncoder expects float waveforms in [-1, 1]; got dtype {wavs.dtype}.")
    if wav_lens.shape != (wavs.shape[0],) or (wav_lens <= 0).any() or (wav_lens > 1 + 1e-6).any():
        raise ValueError(f"SpeechEncoder: wav_lens must be (B={wavs.shape[0]},) relative lengths in (0, 1]; "
                         f"got {wav_lens.tolist()}.")


def build_speech_encoder(d_model=512, num_layers=12, d_ffn=2048, dropout=0.1, kernel_size=31, d_state=16,
                         expand=2, d_conv=4, k=5, adapter_hidden=1024, lm_dim=2560, update_until_epoch=4):
    """A ``SpeechEncoder`` with the reference front-end; defaults are the full-size reference model.

    Example
    -------
    >>> enc = build_speech_encoder(d_model=16, num_layers=1, d_ffn=32, kernel_size=3, d_state=4,
    ...                            adapter_hidden=8, lm_dim=12).eval()
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     enc.encode_wav(torch.randn(48000) * 0.1).shape
    torch.Size([1, 15, 12])
    """
    encoder = ConMambaASR(input_size=640, d_model=d_model, num_layers=num_layers, d_ffn=d_ffn,
                          dropout=dropout, kernel_size=kernel_size, d_state=d_state, expand=expand,
                          d_conv=d_conv)
    adapter = SpeechAdapter(k=k, encoder_dim=d_model, hidden_dim=adapter_hidden, lm_dim=lm_dim)
    return SpeechEncoder(reference_fbank(), GlobalNormalization(update_until_epoch), reference_cnn(),
                         encoder, adapter)
