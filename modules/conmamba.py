"""ConMamba speech encoder: a Conformer whose self-attention is replaced by a bidirectional Mamba.

Built from SpeechBrain pieces wherever their parameter names match the reference checkpoint
(`1.*` keys of ``model.ckpt``): the Conformer ``ConvolutionModule``, ``PositionalwiseFeedForward``, SB
``LayerNorm`` (key ``.norm.*``) and SB ``Linear`` (key ``.w.*``). The reference builds its encoder inside
SpeechBrain's ``TransformerASR`` with two positional-encoding buffers that it never uses; we do not
register them, and ``reference_positional_buffers`` recreates them for exports in the reference layout.
"""
import torch
import torch.nn as nn
from speechbrain.lobes.models.transformer.Conformer import ConvolutionModule
from speechbrain.lobes.models.transformer.Transformer import PositionalEncoding
from speechbrain.nnet.attention import PositionalwiseFeedForward, RelPosEncXL
from speechbrain.nnet.containers import ModuleList
from speechbrain.nnet.linear import Linear
from speechbrain.nnet.normalization import LayerNorm

from modules.bimamba import BiMamba


class PaddingAwareConvolutionModule(ConvolutionModule):
    """SpeechBrain's Conformer ``ConvolutionModule`` (same parameters and keys) that can ignore right padding.

    Why: its depthwise convolution ("same" padding, ``kernel_size // 2`` frames each side) lets a padded row's
    padding frames leak into its last valid frames, so a row encoded in a padded batch differed from the same row
    encoded alone. With ``lengths``, the frames past each row's end are zeroed just before the depthwise
    convolution, which is exactly the zero padding that row sees alone. Without ``lengths`` (or for full rows) it
    is SpeechBrain's module, bit for bit.
    """

    def forward(self, x, lengths=None):
        """(B, T, D) -> (B, T, D); ``lengths`` (B,) valid frames per row (the rest is padding)."""
        if lengths is None or self.causal:
            return super().forward(x)
        out = self.bottleneck(self.layer_norm(x).transpose(1, 2))  # (B, D, T)
        valid = torch.arange(out.shape[-1], device=out.device) < lengths.to(out.device).view(-1, 1)  # (B, T)
        out = self.conv(out * valid.unsqueeze(1).to(out.dtype))  # (B, D, T)
        return self.after_conv(out.transpose(1, 2))  # (B, T, D)


def _half_step_ffn(d_model, d_ffn, dropout, activation):
    """Macaron feed-forward branch: LayerNorm -> Linear -> act -> Dropout -> Linear -> Dropout.

    Keys ``0.*`` (LayerNorm), ``1.ffn.0.*`` and ``1.ffn.3.*`` (the two Linears), as in the reference.
    """
    return nn.Sequential(
        nn.LayerNorm(d_model),
        PositionalwiseFeedForward(d_ffn=d_ffn, input_size=d_model, dropout=dropout, activation=activation),
        nn.Dropout(dropout),
    )


class ConMambaLayer(nn.Module):
    """One ConMamba layer (spec §1.4), in the reference order::

        x <- x + 0.5 * FFN1(x)
        x <- x + BiMamba(LN1(x))
        x <- x + ConvModule(x)
        x <- LN2(x + 0.5 * FFN2(x))

    Parameters
    ----------
    d_model, d_ffn : int
        Width and feed-forward hidden size.
    kernel_size : int
        Depthwise kernel of the convolution module.
    dropout : float
        Dropout in the FFNs and the convolution module (none on the Mamba branch, as the reference).
    activation : type
        Activation class (GELU in the reference).
    d_state, expand, d_conv : int
        BiMamba hyper-parameters.
    """

    def __init__(self, d_model, d_ffn, kernel_size=31, dropout=0.1, activation=nn.GELU, d_state=16,
                 expand=2, d_conv=4):
        super().__init__()
        self.mamba = BiMamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand)
        self.convolution_module = PaddingAwareConvolutionModule(d_model, kernel_size, bias=True, activation=activation,
                                                    dropout=dropout)
        self.ffn_module1 = _half_step_ffn(d_model, d_ffn, dropout, activation)
        self.ffn_module2 = _half_step_ffn(d_model, d_ffn, dropout, activation)
        self.norm1 = LayerNorm(d_model)
        self.norm2 = LayerNorm(d_model)

    def forward(self, x, lengths=None):
        """(B, T, d_model) -> (B, T, d_model); ``lengths`` (B,) valid frames, see ``BiMamba.forward``."""
        x = x + 0.5 * self.ffn_module1(x)  # (B, T, D)
        x = x + self.mamba(self.norm1(x), lengths=lengths)  # (B, T, D)
        x = x + self.convolution_module(x, lengths=lengths)  # (B, T, D)
        return self.norm2(x + 0.5 * self.ffn_module2(x))  # (B, T, D)


class ConMambaEncoder(nn.Module):
    """A stack of ``ConMambaLayer`` followed by a final LayerNorm (eps 1e-6, key ``norm.norm.*``)."""

    def __init__(self, num_layers, d_model, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(ConMambaLayer(d_model, **layer_kwargs) for _ in range(num_layers))
        self.norm = LayerNorm(d_model, eps=1e-6)

    def forward(self, x, lengths=None):
        """(B, T, d_model) -> (B, T, d_model)."""
        for layer in self.layers:
            x = layer(x, lengths=lengths)
        return self.norm(x)


class ConMambaASR(nn.Module):
    """Input projection + ConMamba encoder; ``state_dict`` keys equal the reference ``1.*`` keys
    minus the two unused positional-encoding buffers.

    Parameters
    ----------
    input_size : int
        Flattened CNN feature size (20 freq bins x 32 channels = 640).
    d_model, num_layers, d_ffn, dropout, kernel_size, d_state, expand, d_conv
        Encoder hyper-parameters (reference: 512, 12, 2048, 0.1, 31, 16, 2, 4).

    Example
    -------
    >>> enc = ConMambaASR(input_size=40, d_model=16, num_layers=1, d_ffn=32, kernel_size=3, d_state=4)
    >>> enc(torch.randn(2, 9, 40)).shape
    torch.Size([2, 9, 16])
    """

    def __init__(self, input_size=640, d_model=512, num_layers=12, d_ffn=2048, dropout=0.1, kernel_size=31,
                 d_state=16, expand=2, d_conv=4):
        super().__init__()
        self.input_size, self.d_model = input_size, d_model
        self.custom_src_module = ModuleList(Linear(input_size=input_size, n_neurons=d_model, bias=True),
                                            nn.Dropout(dropout))
        self.encoder = ConMambaEncoder(num_layers, d_model, d_ffn=d_ffn, kernel_size=kernel_size,
                                       dropout=dropout, d_state=d_state, expand=expand, d_conv=d_conv)

    def forward(self, src, lengths=None):
        """Encode CNN features.

        Parameters
        ----------
        src : torch.Tensor
            (B, T, input_size), or the CNN's (B, T, F, C) which is flattened to F*C (index f*C + c).
        lengths : torch.Tensor, optional
            (B,) valid frames per row (int); lets the backward Mamba direction skip padding.

        Returns
        -------
        torch.Tensor
            (B, T, d_model). No positional encoding is added (as the reference).
        """
        if src.dim() == 4:
            src = src.flatten(start_dim=2)  # (B, T, F*C)
        if src.dim() != 3 or src.shape[-1] != self.input_size:
            raise ValueError(f"ConMambaASR expects (B, T, {self.input_size}) features (or (B, T, F, C) with "
                             f"F*C = {self.input_size}); got {tuple(src.shape)}. Check the CNN front-end "
                             "output size against input_size.")
        return self.encoder(self.custom_src_module(src), lengths=lengths)  # (B, T, d_model)


def reference_positional_buffers(d_model=512, max_len=2500):
    """The two dead buffers the reference ``TransformerASR`` stores, recreated bit-exactly by SpeechBrain.

    Used only when exporting a checkpoint that the reference code must load strictly.

    Returns
    -------
    dict[str, torch.Tensor]
        ``positional_encoding.inv_freq`` (d_model/2,) and ``positional_encoding_decoder.pe``
        (1, max_len, d_model), keyed relative to ``ConMambaASR``.

    Example
    -------
    >>> {k: tuple(v.shape) for k, v in reference_positional_buffers(8, 10).items()}
    {'positional_encoding.inv_freq': (4,), 'positional_encoding_decoder.pe': (1, 10, 8)}
    """
    with torch.device("cpu"):
        return {
            "positional_encoding.inv_freq": RelPosEncXL(d_model).inv_freq.clone(),
            "positional_encoding_decoder.pe": PositionalEncoding(d_model, max_len=max_len).pe.clone(),
        }
