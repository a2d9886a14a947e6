"""Stage 4 streaming alignment: segment arithmetic (spec §3) and the segment-wise encode path."""
import warnings

import pytest
import torch

from modules.speech import build_speech_encoder, cnn_frames, fbank_frames
from src.brain import DuplexForward, streaming_segments

RATE = 16000


@pytest.mark.parametrize("seconds,expected", [
    (2.0, [32000]),  # up to one segment: whole
    (3.0, [48000]),
    (5.9, [94400]),  # floor(5.9 / 3) = 1 piece: the last absorbs the remainder (3-6 s)
    (7.5, [48000, 72000]),  # 2 pieces of int(N * 3 / 7.5) samples, the last takes the rest
    (9.0, [48000, 48000, 48000]),
])
def test_segment_lengths(seconds, expected):
    wav = torch.zeros(int(seconds * RATE))
    pieces = streaming_segments(wav, 3.0)
    assert [p.shape[0] for p in pieces] == expected
    assert torch.equal(torch.cat(pieces), wav)


@pytest.fixture(scope="module")
def forward():
    encoder = build_speech_encoder(d_model=16, num_layers=1, d_ffn=32, kernel_size=3, d_state=4,
                                   adapter_hidden=8, lm_dim=12)
    encoder.train()
    with torch.no_grad():
        encoder.normalizer(torch.randn(2, 50, 80))  # give the normaliser statistics
    return DuplexForward(encoder, lm=None, segment_seconds=1.0).eval()


def test_short_utterance_streams_like_the_whole_pass(forward):
    torch.manual_seed(0)
    wav = torch.randn(1, 12000) * 0.1  # 0.75 s < one segment
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole, whole_lens = forward.speech_encoder(wav, torch.ones(1))
        streamed, streamed_lens = forward.encode_streaming(wav, torch.ones(1))
    assert torch.equal(whole_lens, streamed_lens)
    torch.testing.assert_close(streamed, whole)


def test_segments_are_encoded_independently_then_adapted_once(forward):
    torch.manual_seed(1)
    wav = torch.randn(1, 40000) * 0.1  # 2.5 s at 1 s segments -> 16000 + 24000 samples
    with torch.no_grad():
        streamed, lengths = forward.encode_streaming(wav, torch.ones(1))
        frames = int(cnn_frames(fbank_frames(16000))) + int(cnn_frames(fbank_frames(24000)))  # 26 + 38
        assert int(lengths) == frames // 5 == streamed.shape[1]  # one adapter pass over the concatenation
        # changing the second segment must not change the first segment's frames (no context across segments)
        other = wav.clone()
        other[0, 16000:] = torch.randn(24000) * 0.1
        changed, _ = forward.encode_streaming(other, torch.ones(1))
    first_only = int(cnn_frames(fbank_frames(16000))) // 5  # adapter windows fully inside segment 1
    torch.testing.assert_close(changed[:, :first_only], streamed[:, :first_only])
    assert not torch.allclose(changed[:, first_only:], streamed[:, first_only:])


def test_padded_batch_equals_single_utterances(forward):
    torch.manual_seed(2)
    long, short = torch.randn(40000) * 0.1, torch.randn(28000) * 0.1
    batch = torch.zeros(2, 40000)
    batch[0], batch[1, :28000] = long, short
    with torch.no_grad():
        padded, lengths = forward.encode_streaming(batch, torch.tensor([1.0, 28000 / 40000]))
        alone = [forward.encode_streaming(w[None], torch.ones(1))[0][0] for w in (long, short)]
    assert lengths.tolist() == [a.shape[0] for a in alone]
    for b, expected in enumerate(alone):
        torch.testing.assert_close(padded[b, : expected.shape[0]], expected)
        assert (padded[b, expected.shape[0]:] == 0).all()


# ------------------------------------------------------------------ slice_split: a question over two engine slices
def split_forward(forward, share=1.0):
    """The fixture's encoder in a DuplexForward that splits; training mode, the encoder itself in eval (no dropout),
    as stage 3 runs a frozen encoder."""
    split = DuplexForward(forward.speech_encoder, lm=None, slice_split={"share": share, "cut": [0.3, 0.7]})
    split.train()
    split.speech_encoder.eval()
    return split


def test_a_split_utterance_is_heard_as_the_engine_hears_two_slices(forward, monkeypatch):
    """Rows drawn for a split get the two pieces' own encodings joined (what the duplex engine's listener holds
    after two slices); the other rows of the batch are encoded exactly as alone."""
    torch.manual_seed(3)
    long, short = torch.randn(40000) * 0.1, torch.randn(28000) * 0.1
    batch = torch.zeros(2, 40000)
    batch[0], batch[1, :28000] = long, short
    split = split_forward(forward)
    monkeypatch.setattr(split.slice_split, "draw", lambda num_samples: [17000, None])
    with torch.no_grad():
        padded, lengths = split.encode_speech(batch, torch.tensor([1.0, 28000 / 40000]))
        slices = [forward.speech_encoder(piece[None], torch.ones(1))[0][0] for piece in (long[:17000], long[17000:])]
        engine = torch.cat(slices)  # (P1 + P2, H)
        alone = forward.speech_encoder(short[None], torch.ones(1))[0][0]
    assert lengths.tolist() == [engine.shape[0], alone.shape[0]]
    torch.testing.assert_close(padded[0, :engine.shape[0]], engine)
    torch.testing.assert_close(padded[1, :alone.shape[0]], alone)
    assert (padded[1, alone.shape[0]:] == 0).all()
    whole = forward.speech_encoder(long[None], torch.ones(1))[0][0]
    assert engine.shape != whole.shape or not torch.allclose(engine, whole)  # really two independent pieces


def test_slice_split_only_in_training_and_never_at_share_zero(forward):
    torch.manual_seed(4)
    wavs = torch.randn(3, 32000) * 0.1
    lens = torch.ones(3)
    with torch.no_grad():
        whole, whole_lens = forward.speech_encoder(wavs, lens)
        for split in (split_forward(forward).eval(), split_forward(forward, share=0.0)):
            encoded, encoded_lens = split.encode_speech(wavs, lens)
            assert torch.equal(encoded_lens, whole_lens)
            torch.testing.assert_close(encoded, whole)


def test_slice_split_draws_cuts_inside_the_range_and_leaves_short_utterances_whole():
    from src.brain import SliceSplit
    torch.manual_seed(5)
    cuts = SliceSplit(share=1.0, cut=(0.3, 0.7)).draw([48000] * 200 + [12000])  # the last: 0.75 s < 2 x 0.5 s
    assert all(0.3 * 48000 <= cut <= 0.7 * 48000 for cut in cuts[:200]) and cuts[200] is None
    assert len(set(cuts[:200])) > 150  # spread over the range, not one point
    some = SliceSplit(share=0.25).draw([48000] * 2000)
    assert 0.2 < sum(cut is not None for cut in some) / 2000 < 0.3
    torch.manual_seed(6)
    first = SliceSplit(share=0.5).draw([48000] * 50)
    torch.manual_seed(6)
    assert SliceSplit(share=0.5).draw([48000] * 50) == first  # from torch's generator: a resumed run cuts alike
    for bad in ({"share": 1.5}, {"share": 0.5, "cut": (0.0, 0.5)}, {"share": 0.5, "cut": (0.7, 0.3)}):
        with pytest.raises(ValueError, match="slice_split"):
            SliceSplit(**bad)


def test_batched_segments_equal_each_segment_encoded_alone():
    """The one-pass stage-4 encode against the plain definition: every segment through fbank, normaliser, CNN
    and ConMamba on its own, the row's frames concatenated, one adapter pass."""
    encoder = build_speech_encoder(d_model=16, num_layers=2, d_ffn=32, kernel_size=7, d_state=4,
                                   adapter_hidden=8, lm_dim=12)
    encoder.train()
    with torch.no_grad():
        encoder.normalizer(torch.randn(2, 50, 80))
    streaming = DuplexForward(encoder, lm=None, segment_seconds=1.0).eval()
    torch.manual_seed(9)
    rows = [torch.randn(n) * 0.1 for n in (40000, 13000, 52000)]  # 2, 1 and 3 segments of unequal lengths
    batch = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (3, 52000)
    full = torch.ones(1)

    def alone(segment):
        feats = encoder.normalizer(encoder.compute_features(segment[None]), full)  # (1, T, 80)
        return encoder.encoder(encoder.cnn(feats))[0]  # (T', D)

    with torch.no_grad():
        embeds, lengths = streaming.encode_streaming(batch, torch.tensor([n.shape[0] / 52000 for n in rows]))
        for b, row in enumerate(rows):
            frames = torch.cat([alone(segment) for segment in streaming_segments(row, 1.0)])  # (T'_row, D)
            expected = encoder.adapter(frames[None])[0]  # (P_row, H)
            assert int(lengths[b]) == expected.shape[0]
            torch.testing.assert_close(embeds[b, :expected.shape[0]], expected)
            assert (embeds[b, expected.shape[0]:] == 0).all()


# ------------------------------------------------------------------ slice_padding: speech inside a silent slice
def test_slice_padding_puts_drawn_short_rows_inside_silence_and_leaves_the_rest(monkeypatch):
    from src.brain import SlicePadding
    padding = SlicePadding(share=1.0, slice_seconds=1.0)
    short, long = torch.randn(6000) * 0.1, torch.randn(20000) * 0.1
    batch = torch.zeros(2, 20000)
    batch[0, :6000], batch[1] = short, long
    monkeypatch.setattr(padding, "draw", lambda num_samples: [(1000, 3000, 0.0), None])
    padded, lens = padding.pad(batch, torch.tensor([6000 / 20000, 1.0]))
    n = torch.round(lens * padded.shape[1]).long().tolist()
    assert n == [10000, 20000]
    assert torch.equal(padded[0, 1000:7000], short) and (padded[0, :1000] == 0).all()
    assert (padded[0, 7000:10000] == 0).all() and torch.equal(padded[1], long)


def test_slice_padding_draws_stay_inside_one_slice_at_the_floor():
    from src.brain import SlicePadding
    torch.manual_seed(10)
    padding = SlicePadding(share=1.0, slice_seconds=3.0, floor_dbfs=-50.0)
    plans = padding.draw([16000] * 300 + [48000, 60000])
    assert plans[300] is None and plans[301] is None  # already a whole slice
    assert all(before >= 0 and after >= 0 and before + after <= 32000 for before, after, _ in plans[:300])
    assert all(10 ** (-90 / 20) <= level <= 10 ** (-50 / 20) for _, _, level in plans[:300])
    assert len({before + after for before, after, _ in plans[:300]}) > 250  # spread, not one length
    torch.manual_seed(11)
    some = SlicePadding(share=0.5).draw([16000] * 2000)
    assert 0.45 < sum(plan is not None for plan in some) / 2000 < 0.55
    for bad in ({"share": 2.0}, {"share": 0.5, "slice_seconds": 0}, {"share": 0.5, "floor_dbfs": -120}):
        with pytest.raises(ValueError, match="slice_padding"):
            SlicePadding(**bad)


def test_padded_rows_are_encoded_as_the_padded_audio_alone_and_only_in_training(forward, monkeypatch):
    torch.manual_seed(12)
    wavs = torch.randn(2, 12000) * 0.1
    padded = DuplexForward(forward.speech_encoder, lm=None, slice_padding={"share": 1.0, "slice_seconds": 1.0})
    padded.train()
    padded.speech_encoder.eval()  # no dropout, as a frozen encoder
    monkeypatch.setattr(padded.slice_padding, "draw", lambda num_samples: [(800, 1200, 0.0), None])
    with torch.no_grad():
        encoded, lengths = padded.encode_speech(wavs, torch.ones(2))
        inside = torch.cat([torch.zeros(800), wavs[0], torch.zeros(1200)])  # (14000,): the slice the engine hears
        expected = forward.speech_encoder(inside[None], torch.ones(1))[0][0]
        assert int(lengths[0]) == expected.shape[0] > int(lengths[1])
        torch.testing.assert_close(encoded[0, :expected.shape[0]], expected)
        padded.eval()
        plain, plain_lens = padded.encode_speech(wavs, torch.ones(2))
        whole, whole_lens = forward.speech_encoder(wavs, torch.ones(2))
    assert torch.equal(plain_lens, whole_lens)
    torch.testing.assert_close(plain, whole)
