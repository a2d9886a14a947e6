"""Speech encoder: frame arithmetic, BiMamba directions, reference key layout, adapter, normaliser modes."""
import math
import pathlib

import pytest
import torch

from modules.adapter import SpeechAdapter
from modules.bimamba import BiMamba
from modules.conmamba import ConMambaASR, reference_positional_buffers
from modules.speech import (build_speech_encoder, cnn_frames, fbank_frames, frames_per_position,
                            reference_cnn, reference_fbank, speech_positions)

KEYS_TSV = pathlib.Path(__file__).resolve().parent / "data" / "reference" / "upstream_model_ckpt_keys.tsv"
TINY = dict(d_model=64, num_layers=2, d_ffn=128, d_state=8, adapter_hidden=32, lm_dim=48)


def _tiny_encoder(seed=0):
    torch.manual_seed(seed)
    return build_speech_encoder(**TINY)


def _speech_like(num_samples, seed=0):
    """Noise with a slow amplitude envelope, so fbank frames differ from each other."""
    gen = torch.Generator().manual_seed(seed)
    envelope = 0.05 + 0.2 * torch.sin(torch.linspace(0, 6 * math.pi, num_samples)).abs()
    return torch.randn(num_samples, generator=gen) * envelope  # (N,)


# ---------------------------------------------------------------------------------------------- shapes
def test_three_seconds_give_301_fbank_76_encoder_15_positions():
    enc = _tiny_encoder()
    wav = _speech_like(48000).unsqueeze(0)  # (1, 48000)
    with torch.no_grad():
        enc(wav, torch.ones(1), epoch=1)  # training mode sets the normaliser statistics
        enc.eval()
        feats = enc.compute_features(wav)
        cnn_out = enc.cnn(feats)
        encoded = enc.encoder(cnn_out)
        embeds, lengths = enc(wav, torch.ones(1))
    assert feats.shape == (1, 301, 80)
    assert cnn_out.shape == (1, 76, 20, 32)
    assert encoded.shape == (1, 76, 64)
    assert embeds.shape == (1, 15, 48) and lengths.tolist() == [15]
    assert (fbank_frames(48000), cnn_frames(301), speech_positions(48000)) == (301, 76, 15)
    assert frames_per_position() == 20


def test_fbank_uses_reference_stft_not_speechbrain_defaults():
    """Spec §1.1: 512-point FFT (257 bins), 32 ms Hamming window; SpeechBrain's defaults are 400 / 25 ms."""
    fbank = reference_fbank()
    spectrum = fbank.compute_STFT(_speech_like(16000).unsqueeze(0))  # (1, T, 257, 2)
    assert spectrum.shape[1:3] == (101, 257) and fbank.compute_STFT.win_length == 512


@pytest.mark.parametrize("num_samples", [1, 3199, 3200, 12345, 24000])
def test_length_helpers_match_real_output_sizes(num_samples):
    enc = _tiny_encoder().train()
    with torch.no_grad():
        embeds, lengths = enc(_speech_like(num_samples).unsqueeze(0), torch.ones(1))
    assert embeds.shape[1] == lengths.item() == speech_positions(num_samples)


def test_padded_batch_lengths_equal_single_row_lengths():
    enc = _tiny_encoder().train()
    full, short = _speech_like(48000, seed=1), _speech_like(24000, seed=2)
    batch = torch.stack([full, torch.cat([short, torch.zeros(24000)])])  # (2, 48000)
    with torch.no_grad():
        embeds, lengths = enc(batch, torch.tensor([1.0, 0.5]))
        short_alone, _ = enc(short.unsqueeze(0), torch.ones(1))
    assert embeds.shape == (2, 15, 48)
    assert lengths.dtype == torch.int64 and lengths.tolist() == [15, short_alone.shape[1]]


def test_very_short_slice_gives_zero_positions_not_a_crash():
    enc = _tiny_encoder().train()
    for num_samples in (1, 100, 2000):
        assert enc.encode_wav(_speech_like(num_samples)).shape == (1, 0, 48)


def test_bad_inputs_raise_readable_errors():
    enc = _tiny_encoder()
    with pytest.raises(ValueError, match="mono"):
        enc.encode_wav(torch.zeros(2, 16000))
    with pytest.raises(ValueError, match="relative lengths"):
        enc(torch.zeros(2, 16000), torch.tensor([1.0, 1.5]))
    with pytest.raises(ValueError, match="N > 0"):
        enc(torch.zeros(1, 0), torch.ones(1))
    with pytest.raises(ValueError, match="640"):
        ConMambaASR(d_model=16, num_layers=1, d_ffn=32, d_state=4)(torch.zeros(1, 5, 80))


# ---------------------------------------------------------------------------------------------- BiMamba
def _tiny_bimamba(seed=0):
    torch.manual_seed(seed)
    return BiMamba(d_model=16, d_state=4)


def test_bimamba_output_depends_on_time_order():
    mixer = _tiny_bimamba()
    x = torch.randn(2, 11, 16)
    with torch.no_grad():
        assert not torch.allclose(mixer(x.flip(1)), mixer(x).flip(1), atol=1e-4)


def test_bimamba_with_tied_directions_is_time_reversal_equivariant():
    mixer = _tiny_bimamba()
    with torch.no_grad():
        for name in ("conv1d", "x_proj", "dt_proj"):
            getattr(mixer, name + "_b").load_state_dict(getattr(mixer, name).state_dict())
        mixer.A_b_log.copy_(mixer.A_log)
        mixer.D_b.copy_(mixer.D)
        x = torch.randn(2, 11, 16)
        torch.testing.assert_close(mixer(x.flip(1)), mixer(x).flip(1), rtol=1e-5, atol=1e-5)


def test_bimamba_backward_parameters_are_used():
    mixer = _tiny_bimamba()
    x = torch.randn(1, 9, 16)
    with torch.no_grad():
        before = mixer(x)
        mixer.conv1d_b.weight.normal_()
        assert not torch.allclose(before, mixer(x), atol=1e-4)


def test_bimamba_lengths_make_padded_rows_match_unpadded():
    mixer = _tiny_bimamba()
    short = torch.randn(1, 7, 16)
    padded = torch.cat([short, torch.randn(1, 5, 16)], dim=1)  # (1, 12, 16) with 5 junk frames
    with torch.no_grad():
        alone = mixer(short)
        masked = mixer(padded, lengths=torch.tensor([7]))[:, :7]
        unmasked = mixer(padded)[:, :7]
    torch.testing.assert_close(masked, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked, alone, atol=1e-4)  # reference behaviour: backward starts in padding


def test_bimamba_init_follows_mamba_ssm():
    mixer = BiMamba(d_model=64, d_state=16)
    for dt_proj, log_a in ((mixer.dt_proj, mixer.A_log), (mixer.dt_proj_b, mixer.A_b_log)):
        dt = torch.nn.functional.softplus(dt_proj.bias.detach())
        assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
        torch.testing.assert_close(log_a.detach()[3], torch.log(torch.arange(1, 17).float()))
    assert mixer.dt_rank == 4 and mixer.x_proj.out_features == 4 + 2 * 16


# ---------------------------------------------------------------------------------------------- layout
def _reference_rows(prefixes):
    rows = {}
    for line in KEYS_TSV.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _ = line.split("\t")
        if key.split(".")[0] in prefixes:
            rows[key] = tuple(int(n) for n in shape.split("x"))
    return rows


def test_full_size_keys_shapes_and_counts_match_reference():
    with torch.device("meta"):
        parts = [reference_cnn(), ConMambaASR(), SpeechAdapter()]
    ours = {f"{i}.{key}": tuple(value.shape)
            for i, part in enumerate(parts) for key, value in part.state_dict().items()}
    dead_buffers = {f"1.{key}": tuple(v.shape) for key, v in reference_positional_buffers().items()}
    assert {**ours, **dead_buffers} == _reference_rows({"0", "1", "2"})
    counts = [sum(p.numel() for p in part.parameters()) for part in parts]
    assert counts == [25_504, 82_247_168, 5_246_464]


def test_reference_positional_buffers_values():
    buffers = reference_positional_buffers()
    inv_freq, pe = buffers["positional_encoding.inv_freq"], buffers["positional_encoding_decoder.pe"]
    assert inv_freq.shape == (256,) and pe.shape == (1, 2500, 512)
    torch.testing.assert_close(inv_freq[1], torch.tensor(10000.0 ** (-2 / 512)))
    torch.testing.assert_close(pe[0, 7, 0::2], torch.sin(7 * inv_freq))  # sin on even, cos on odd channels
    torch.testing.assert_close(pe[0, 7, 1::2], torch.cos(7 * inv_freq))


def test_encoder_flattens_cnn_output_frequency_major():
    torch.manual_seed(0)
    enc = ConMambaASR(d_model=16, num_layers=1, d_ffn=32, d_state=4).eval()
    cnn_out = torch.randn(1, 6, 20, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(cnn_out), enc(cnn_out.reshape(1, 6, 640)))
        assert not torch.allclose(enc(cnn_out), enc(cnn_out.transpose(2, 3).reshape(1, 6, 640)))


# ---------------------------------------------------------------------------------------------- adapter
def test_adapter_concatenates_k_frames_in_time_order_and_drops_remainder():
    torch.manual_seed(0)
    adapter = SpeechAdapter(k=5, encoder_dim=4, hidden_dim=8, lm_dim=6)
    x = torch.randn(2, 13, 4)
    windows = torch.stack([x[:, 5 * p: 5 * p + 5].reshape(2, 20) for p in range(2)], dim=1)  # (2, 2, 20)
    expected = adapter.linear2(torch.relu(adapter.linear1(windows)))
    torch.testing.assert_close(adapter(x), expected)
    torch.testing.assert_close(adapter(x[:, :10]), expected)
    assert adapter(x[:, :4]).shape == (2, 0, 6)
    assert adapter.output_lengths(torch.tensor([13, 4, 76])).tolist() == [2, 0, 15]


# ---------------------------------------------------------------------------------------------- normaliser
def _stats(enc):
    return enc.normalizer.count, enc.normalizer.glob_mean.clone(), enc.normalizer.glob_std.clone()


def test_eval_mode_is_deterministic_and_does_not_touch_normaliser_stats():
    enc = _tiny_encoder().train()
    enc(_speech_like(48000, seed=3).unsqueeze(0), torch.ones(1), epoch=1)  # training sets the stats
    enc.eval()
    count, mean, std = _stats(enc)
    wav = _speech_like(48000, seed=4)
    with torch.no_grad():
        first, second = enc.encode_wav(wav), enc.encode_wav(wav * 2)
        again = enc.encode_wav(wav)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, second)
    new_count, new_mean, new_std = _stats(enc)
    assert new_count == count and torch.equal(new_mean, mean) and torch.equal(new_std, std)


def test_train_mode_updates_stats_until_epoch_four():
    enc = _tiny_encoder().train()
    wavs = [_speech_like(16000, seed=s).unsqueeze(0) * (s + 1) for s in range(3)]
    with torch.no_grad():
        enc(wavs[0], torch.ones(1), epoch=1)
        count, mean, _ = _stats(enc)
        enc(wavs[1], torch.ones(1), epoch=3)
        assert enc.normalizer.count > count and not torch.equal(enc.normalizer.glob_mean, mean)
        count, mean, _ = _stats(enc)
        enc(wavs[2], torch.ones(1), epoch=4)
    assert enc.normalizer.count == count and torch.equal(enc.normalizer.glob_mean, mean)


def test_eval_without_statistics_warns_and_still_encodes():
    enc = _tiny_encoder().eval()
    with pytest.warns(UserWarning, match="no statistics"):
        out = enc.encode_wav(_speech_like(16000))
    assert out.shape == (1, speech_positions(16000), 48) and enc.normalizer.count == 0


def test_encode_wav_equals_batched_forward_of_full_rows():
    enc = _tiny_encoder().train()
    wav = _speech_like(32000, seed=5)
    with torch.no_grad():
        enc(wav.unsqueeze(0), torch.ones(1), epoch=1)
        enc.eval()
        batched, _ = enc(torch.stack([wav, wav * 0.5]), torch.ones(2))
        single = enc.encode_wav(wav)
    torch.testing.assert_close(single[0], batched[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="N > 0"):
        enc.encode_wav(torch.zeros(0))


def test_bf16_weight_conversion_keeps_norms_ssm_parameters_and_dt_proj_in_fp32():
    """GraphedSpeechEncoder's one-off conversion: what autocast would compute in bf16, nothing else."""
    from duplex.cuda_encoder import cast_matmul_weights
    torch.manual_seed(0)
    enc = build_speech_encoder(d_model=32, num_layers=1, d_ffn=64, kernel_size=3, d_state=4, adapter_hidden=16,
                               lm_dim=24)
    converted = cast_matmul_weights([enc.cnn, enc.encoder, enc.adapter], torch.bfloat16)
    dtypes = {name: p.dtype for name, p in enc.named_parameters()}
    assert converted > 0
    assert all(dtypes[n] == torch.float32 for n in dtypes if "dt_proj" in n or "norm" in n or "A_log" in n)
    assert dtypes["adapter.linear1.weight"] == torch.bfloat16
    assert any(d == torch.bfloat16 and "mamba.in_proj" in n for n, d in dtypes.items())


def test_feature_constants_are_moved_where_the_graph_runs():
    """The STFT window and filterbank frequencies are plain tensor attributes that ``.to()`` leaves on the
    CPU (so every call copied the filterbank from pageable memory, which a CUDA graph cannot capture);
    move_feature_constants moves them and tells the filterbank to build its matrix there (meta device
    here as the stand-in for a GPU)."""
    from duplex.cuda_encoder import move_feature_constants
    enc = build_speech_encoder(d_model=32, num_layers=1, d_ffn=64, kernel_size=3, d_state=4, adapter_hidden=16,
                               lm_dim=24)
    meta = torch.device("meta")
    assert move_feature_constants(enc.compute_features, meta) >= 4  # window, band, f_central, all_freqs_mat
    fbank = enc.compute_features.compute_fbanks
    assert enc.compute_features.compute_STFT.window.device == meta
    assert fbank.f_central.device == meta and fbank.all_freqs_mat.device == meta and fbank.device_inp == meta
    assert move_feature_constants(enc.compute_features, meta) == 0  # nothing left to move


def test_conmamba_padded_rows_equal_rows_encoded_alone():
    """With lengths, a row's valid frames do not depend on its padding (the depthwise convolution's kernel reaches
    3 frames past the end here), so a padded batch gives each row exactly what it gives alone."""
    torch.manual_seed(7)
    encoder = ConMambaASR(input_size=24, d_model=16, num_layers=2, d_ffn=32, kernel_size=7, d_state=4).eval()
    rows = [torch.randn(n, 24) for n in (19, 11, 4)]
    padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (3, 19, 24)
    padded[1, 11:] = 5.0  # padding that is far from zero, as a neighbour's frames would be
    with torch.no_grad():
        batched = encoder(padded, lengths=torch.tensor([19, 11, 4]))  # (3, 19, 16)
        unmasked = encoder(padded)
        for b, row in enumerate(rows):
            alone = encoder(row[None])[0]  # (T_b, 16)
            torch.testing.assert_close(batched[b, :row.shape[0]], alone)
        assert not torch.allclose(unmasked[1, :11], encoder(rows[1][None])[0])  # the leak the lengths remove


def test_padding_aware_convolution_is_speechbrains_module_without_lengths():
    from speechbrain.lobes.models.transformer.Conformer import ConvolutionModule

    from modules.conmamba import PaddingAwareConvolutionModule
    torch.manual_seed(8)
    ours, theirs = PaddingAwareConvolutionModule(16, 7).eval(), ConvolutionModule(16, 7).eval()
    theirs.load_state_dict(ours.state_dict())  # same keys and shapes
    x = torch.randn(2, 13, 16)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
        torch.testing.assert_close(ours(x, lengths=torch.tensor([13, 13])), theirs(x))  # full rows: no change
