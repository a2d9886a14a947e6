"""Sampling: HF-equivalent filters, greedy, seeded reproducibility, bad settings."""
import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from duplex.sampling import SamplingConfig, filter_top_k, filter_top_p, sample, sample_among


@pytest.mark.parametrize("top_p", [0.1, 0.7, 0.75, 0.95])
def test_top_p_matches_transformers(top_p):
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 3
    expected = TopPLogitsWarper(top_p)(None, logits.clone())
    assert torch.equal(filter_top_p(logits, top_p), expected)


@pytest.mark.parametrize("top_k", [1, 5, 50])
def test_top_k_matches_transformers(top_k):
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(1))
    assert torch.equal(filter_top_k(logits, top_k), TopKLogitsWarper(top_k)(None, logits.clone()))


def test_greedy_and_zero_temperature_take_argmax():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(2))
    assert torch.equal(sample(logits, SamplingConfig(greedy=True)), logits.argmax(-1))
    assert torch.equal(sample(logits, SamplingConfig(temperature=0.0)), logits.argmax(-1))


def test_nucleus_draws_only_from_the_kept_set():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    config = SamplingConfig(temperature=1.0, top_p=0.75)
    g = torch.Generator().manual_seed(3)
    drawn = {int(sample(probs.log(), config, g)) for _ in range(300)}
    assert drawn == {0, 1}


def test_same_seed_same_tokens_and_different_seed_differs():
    logits = torch.zeros(1, 1000)
    config = SamplingConfig(temperature=0.8, top_p=0.9, top_k=500)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return [int(sample(logits, config, g)) for _ in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}])
def test_bad_settings_raise(kwargs):
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)


def test_logits_must_be_2d():
    with pytest.raises(ValueError, match=r"\(B, V\)"):
        sample(torch.zeros(1, 2, 3), SamplingConfig())


def test_sample_among_draws_only_candidates_exactly_as_sample_on_their_logits():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(7))
    logits[:, 0] = 100.0  # the best token overall is not a candidate
    candidates = [5, 17, 33]
    config = SamplingConfig(temperature=0.95, top_p=0.75, top_k=50)
    picked = sample_among(logits, candidates, config, torch.Generator().manual_seed(1))
    direct = sample(logits[:, candidates], config, torch.Generator().manual_seed(1))
    assert picked.tolist() == [candidates[i] for i in direct.tolist()]
