"""The ASR pre-training network (paper §3.1): ConMamba encoder + Mamba decoder, CTC and attention heads.

DuplexMamba starts from the encoder of a Mamba ASR model trained as in Jiang et al. (xi-j/Mamba-ASR,
`conmambamamba`): the ConMamba encoder, a decoder whose layers replace self-attention by a causal Mamba over the
target ("self" mixer) and cross-attention by a causal Mamba over the encoder frames followed by the target
("cross" mixer: only the target positions are kept), a CTC head on the encoder and a sequence head on the decoder.

`MambaASRModel` is an `nn.ModuleList` [cnn, asr, seq_lin, ctc_lin] so that its `state_dict()` keys follow the
reference ASR checkpoint: `0.*` CNN, `1.custom_src_module.*` + `1.encoder.*` (exactly `modules.conmamba.ConMambaASR`,
what stage 1 loads through `asr_checkpoint_folder`), `1.custom_tgt_module.*` + `1.decoder.*`, `2.w.*`, `3.w.*`.

Differences from the reference decoder, both about padding: the cross mixer reads each row's *valid* encoder frames
followed directly by its target (the reference concatenated the padded memory, so short rows crossed padding
before their first token), and the sinusoidal target positions are computed, not stored (the reference keeps a
2500 x d_model table in every checkpoint).
"""
import math

import torch
from speechbrain.lobes.models.transformer.Transformer import NormalizedEmbedding
from speechbrain.nnet.attention import PositionalwiseFeedForward
from speechbrain.nnet.containers import ModuleList
from speechbrain.nnet.linear import Linear
from speechbrain.nnet.normalization import LayerNorm
from torch import nn

from modules.bimamba import CausalMamba
from modules.conmamba import ConMambaASR


def sinusoidal_positions(length, d_model, device=None):
    """(1, length, d_model) absolute sine/cosine positions (even channels sin, odd cos), as SpeechBrain's
    `PositionalEncoding` for the decoder input."""
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)  # (L, 1)
    frequency = torch.exp(torch.arange(0, d_model, 2, device=device, dtype=torch.float32)
                          * -(math.log(10000.0) / d_model))  # (d_model / 2,)
    table = torch.zeros(length, d_model, device=device)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table.unsqueeze(0)  # (1, L, d_model)


def memory_then_target(memory, memory_lengths, target):
    """Per row, the valid encoder frames followed directly by the target, right-padded with zeros.

    Returns ``(joined (B, T + L, D), target_index (B, L))`` where ``target_index[b, j]`` is the position of target
    step j in ``joined[b]``. With ``memory_lengths`` None every frame is valid (plain concatenation).
    """
    batch, frames, _ = memory.shape
    steps = target.shape[1]
    if memory_lengths is None:
        index = torch.arange(frames, frames + steps, device=memory.device).expand(batch, steps)
        return torch.cat([memory, target], dim=1), index
    lengths = memory_lengths.to(memory.device).long().clamp(max=frames).view(batch, 1)  # (B, 1)
    positions = torch.arange(frames + steps, device=memory.device).expand(batch, -1)  # (B, T + L)
    both = torch.cat([memory, target], dim=1)  # (B, T + L, D): frame t at t, target step j at T + j
    source = torch.where(positions < lengths, positions, frames + positions - lengths)  # (B, T + L)
    valid = positions < lengths + steps  # (B, T + L)
    source = torch.where(valid, source, torch.zeros_like(source))
    joined = both.gather(1, source.unsqueeze(-1).expand(-1, -1, both.shape[-1]))  # (B, T + L, D)
    joined = joined * valid.unsqueeze(-1)
    target_index = lengths + torch.arange(steps, device=memory.device)  # (B, L)
    return joined, target_index


class MambaDecoderLayer(nn.Module):
    """Pre-norm decoder layer: x += self_mamba(LN1 x); x += cross_mamba(LN2 [memory, x])[target]; x += FFN(LN3 x).

    Keys as the reference: ``self_mamba.*``, ``cross_mamba.*``, ``pos_ffn.ffn.{0,3}.*``, ``norm{1,2,3}.norm.*``.
    """

    def __init__(self, d_model, d_ffn, dropout=0.1, activation=nn.GELU, d_state=16, expand=2, d_conv=4):
        super().__init__()
        self.self_mamba = CausalMamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand)
        self.cross_mamba = CausalMamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand)
        self.pos_ffn = PositionalwiseFeedForward(d_ffn=d_ffn, input_size=d_model, dropout=dropout,
                                                 activation=activation)
        self.norm1 = LayerNorm(d_model, eps=1e-6)
        self.norm2 = LayerNorm(d_model, eps=1e-6)
        self.norm3 = LayerNorm(d_model, eps=1e-6)
        self.dropout = nn.Dropout(dropout)

    def forward(self, target, memory, memory_lengths=None):
        """target (B, L, D), memory (B, T, D) -> (B, L, D)."""
        target = target + self.dropout(self.self_mamba(self.norm1(target)))  # (B, L, D)
        joined, index = memory_then_target(memory, memory_lengths, self.norm2(target))  # (B, T+L, D), (B, L)
        crossed = self.cross_mamba(joined)  # (B, T + L, D)
        crossed = crossed.gather(1, index.unsqueeze(-1).expand(-1, -1, crossed.shape[-1]))  # (B, L, D)
        target = target + self.dropout(crossed)
        return target + self.dropout(self.pos_ffn(self.norm3(target)))  # (B, L, D)


class MambaDecoder(nn.Module):
    """A stack of `MambaDecoderLayer` and a final LayerNorm (eps 1e-6, key ``norm.norm.*``)."""

    def __init__(self, num_layers, d_model, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(MambaDecoderLayer(d_model, **layer_kwargs) for _ in range(num_layers))
        self.norm = LayerNorm(d_model, eps=1e-6)

    def forward(self, target, memory, memory_lengths=None):
        for layer in self.layers:
            target = layer(target, memory, memory_lengths)
        return self.norm(target)  # (B, L, D)


class ConMambaMambaASR(ConMambaASR):
    """`ConMambaASR` (keys ``custom_src_module.*``, ``encoder.*``, unchanged) plus the target embedding
    (``custom_tgt_module.layers.0.emb.Embedding.weight``, scaled by sqrt(d_model)) and the Mamba decoder.

    Example
    -------
    >>> asr = ConMambaMambaASR(vocab_size=10, input_size=40, d_model=16, num_layers=1, num_decoder_layers=1,
    ...                        d_ffn=32, kernel_size=3, d_state=4)
    >>> memory = asr.encode(torch.randn(2, 9, 40))
    >>> asr.decode(torch.randint(0, 10, (2, 5)), memory, torch.tensor([9, 6])).shape
    torch.Size([2, 5, 16])
    """

    def __init__(self, vocab_size, input_size=640, d_model=512, num_layers=12, num_decoder_layers=6, d_ffn=2048,
                 dropout=0.1, kernel_size=31, d_state=16, expand=2, d_conv=4, activation=nn.GELU):
        super().__init__(input_size=input_size, d_model=d_model, num_layers=num_layers, d_ffn=d_ffn,
                         dropout=dropout, kernel_size=kernel_size, d_state=d_state, expand=expand, d_conv=d_conv)
        self.vocab_size = vocab_size
        self.custom_tgt_module = ModuleList(NormalizedEmbedding(d_model, vocab_size))
        self.decoder = MambaDecoder(num_decoder_layers, d_model, d_ffn=d_ffn, dropout=dropout,
                                    activation=activation, d_state=d_state, expand=expand, d_conv=d_conv)

    def encode(self, src, lengths=None):
        """CNN features (B, T, 640) or (B, T, F, C) -> encoder frames (B, T, d_model)."""
        return super().forward(src, lengths=lengths)

    def decode(self, tokens, memory, memory_lengths=None):
        """Target ids (B, L) (starting with bos) + encoder frames (B, T, D) -> decoder states (B, L, D)."""
        target = self.custom_tgt_module(tokens)  # (B, L, D)
        target = target + sinusoidal_positions(tokens.shape[1], self.d_model, tokens.device)
        return self.decoder(target, memory, memory_lengths)

    def forward(self, src, tokens, lengths=None):
        """Returns (encoder frames (B, T, D), decoder states (B, L, D))."""
        memory = self.encode(src, lengths)
        return memory, self.decode(tokens, memory, lengths)


class MambaASRModel(nn.ModuleList):
    """[cnn, asr, seq_lin, ctc_lin], the reference ASR checkpoint's order (`model.ckpt` keys 0.* .. 3.*)."""

    def __init__(self, cnn, asr, seq_lin, ctc_lin):
        super().__init__([cnn, asr, seq_lin, ctc_lin])

    @property
    def cnn(self):
        return self[0]

    @property
    def asr(self):
        return self[1]

    @property
    def seq_lin(self):
        return self[2]

    @property
    def ctc_lin(self):
        return self[3]


def output_head(d_model, vocab_size):
    """SpeechBrain Linear (key ``w.*``), as the reference's ``seq_lin`` / ``ctc_lin``."""
    return Linear(input_size=d_model, n_neurons=vocab_size, bias=True)
