"""Loss modes (paper eq. 3-5 vs the reference's averaged CE) and the validation statistics."""
import math

import pytest
import torch
import torch.nn.functional as F

from src.metrics import TeacherForcedStats
from src.objectives import IGNORE_INDEX, compute_loss, paper_loss, reference_loss


def batch():
    """Two samples: [state, -100, r, r, eos, pad] and [state, -100, r, eos, pad, pad]."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[7, IGNORE_INDEX, 3, 4, 0, IGNORE_INDEX], [8, IGNORE_INDEX, 5, 0, IGNORE_INDEX, IGNORE_INDEX]])
    state_mask = torch.zeros(2, 6, dtype=torch.bool)
    state_mask[:, 0] = True
    return logits, labels, state_mask


def nll(logits, b, t, target):
    return -F.log_softmax(logits[b, t], dim=-1)[target]


def test_paper_loss_is_state_plus_response_mean():
    logits, labels, state_mask = batch()
    state = (nll(logits, 0, 0, 7) + nll(logits, 1, 0, 8)) / 2
    response = sum(nll(logits, b, t, int(labels[b, t])) for b, t in [(0, 2), (0, 3), (0, 4), (1, 2), (1, 3)]) / 5
    assert paper_loss(logits, labels, state_mask, 0.0).item() == pytest.approx((state + response).item(), rel=1e-5)


def test_reference_loss_is_one_average_with_smoothing():
    logits, labels, state_mask = batch()
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                               label_smoothing=0.1)
    assert reference_loss(logits, labels, 0.1).item() == pytest.approx(expected.item(), rel=1e-6)
    assert compute_loss("reference", logits, labels, state_mask, 0.1).item() == pytest.approx(expected.item())
    assert paper_loss(logits, labels, state_mask, 0.1).item() != pytest.approx(expected.item(), rel=1e-3)


def test_without_state_tokens_both_modes_agree():
    """Stages 1-2: no state token, eq. 5 reduces to eq. 2, i.e. the reference's mean CE."""
    logits, labels, _ = batch()
    no_state = torch.zeros_like(labels, dtype=torch.bool)
    assert paper_loss(logits, labels, no_state, 0.1).item() == pytest.approx(reference_loss(logits, labels, 0.1).item())


def test_unknown_loss_mode_is_a_clear_error():
    logits, labels, state_mask = batch()
    with pytest.raises(ValueError, match="loss_mode"):
        compute_loss("sum", logits, labels, state_mask, 0.1)


def test_stats_ignore_padding_and_report_state_accuracy():
    labels = torch.tensor([[2, IGNORE_INDEX, 1, IGNORE_INDEX]])
    logits = torch.full((1, 4, 3), -10.0)
    logits[0, 0, 2] = 10.0  # state token right
    logits[0, 2, 0] = 10.0  # response token wrong
    logits[0, 3, 0] = 10.0  # padding: would be "wrong" if counted
    state_mask = torch.tensor([[True, False, False, False]])
    stats = TeacherForcedStats()
    stats.append(logits, labels, state_mask)
    summary = stats.summarize()
    assert summary["ACC"] == pytest.approx(0.5)
    assert summary["STATE_ACC"] == pytest.approx(1.0)
    mean_nll = (nll(logits, 0, 0, 2) + nll(logits, 0, 2, 1)).item() / 2
    assert summary["PPL"] == pytest.approx(math.exp(mean_nll), rel=1e-5)
