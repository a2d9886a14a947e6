"""src.objectives.alignment_ctc_loss (YAML `alignment_ctc`): CTC of the transcript on the adapter output, read
through the LM's token embeddings by cosine similarity."""
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F

from src.brain import DuplexBrain
from src.objectives import alignment_ctc_loss
from src.stages import run_stage

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "corpus"

V, H = 40, 16


def _embeddings(seed=0):
    return torch.randn(V, H, generator=torch.Generator().manual_seed(seed))  # (V, H)


def test_speech_that_spells_the_tokens_scores_near_zero_and_noise_scores_high():
    embeddings = _embeddings()
    targets = [[5, 9, 9, 3], [7, 2]]
    # row 0: 5 9 blank 9 3 (a blank between the repeated 9s), row 1: 7 2 then padding
    speech = torch.stack([embeddings[[5, 9, 0, 9, 3]], torch.cat([embeddings[[7, 2]], torch.zeros(3, H)])])
    lens = torch.tensor([5, 2])
    aligned = alignment_ctc_loss(speech * 3.0, lens, targets, embeddings, scale=30.0)  # any norm: cosine
    noise = alignment_ctc_loss(torch.randn(2, 5, H, generator=torch.Generator().manual_seed(1)), lens, targets,
                               embeddings, scale=30.0)
    assert aligned < 0.05 < 1.0 < noise


def test_equals_torch_ctc_on_the_cosine_logits_of_the_rows_with_a_transcript():
    embeddings = _embeddings()
    speech = torch.randn(3, 6, H, generator=torch.Generator().manual_seed(2))
    lens = torch.tensor([6, 4, 5])
    targets = [[1, 2, 3], [], [4, 4]]  # row 1 has no transcript (not an ASR row): left out
    got = alignment_ctc_loss(speech, lens, targets, embeddings, scale=7.0)
    logits = 7.0 * F.normalize(speech[[0, 2]], dim=-1) @ F.normalize(embeddings, dim=-1).T  # (2, 6, V)
    expected = F.ctc_loss(logits.log_softmax(-1).transpose(0, 1), torch.tensor([1, 2, 3, 4, 4]),
                          torch.tensor([6, 5]), torch.tensor([3, 2]), blank=0, reduction="mean")
    torch.testing.assert_close(got, expected)


def test_gradient_reaches_the_speech_not_the_embeddings_and_impossible_rows_give_zero():
    embeddings = _embeddings().requires_grad_(True)
    speech = torch.randn(2, 3, H, requires_grad=True)
    loss = alignment_ctc_loss(speech, torch.tensor([3, 3]), [[1, 2], [1, 2, 3, 4, 5]], embeddings, scale=10.0)
    assert math.isfinite(loss.item())  # row 1: 5 tokens on 3 positions cannot align (zero_infinity)
    loss.backward()
    assert embeddings.grad is None and speech.grad.abs().sum() > 0
    assert not speech.grad[1].any()  # the impossible row contributes nothing


def test_a_batch_without_transcripts_gives_a_differentiable_zero():
    speech = torch.randn(2, 3, H, requires_grad=True)
    loss = alignment_ctc_loss(speech, torch.tensor([3, 2]), [[], []], _embeddings(), scale=10.0)
    loss.backward()
    assert loss.item() == 0.0 and speech.grad is not None


class RecordsAlignment(DuplexBrain):
    losses = []

    def alignment_loss(self, sequence, batch, scale):
        loss = super().alignment_loss(sequence, batch, scale)
        RecordsAlignment.losses.append(loss.item())
        return loss


@pytest.mark.slow  # two tiny CPU trainings
@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_tiny_stage1_adds_the_alignment_ctc_only_when_weighted(tmp_path, weight):
    """Every row of the sample corpus as an ASR row (transcripts_as_targets), with and without the added CTC:
    it is computed on each training batch when weighted (finite, positive), never otherwise."""
    RecordsAlignment.losses = []
    brain = run_stage(RecordsAlignment, [
        str(ROOT / "hparams" / "tiny" / "train_stage1.yaml"), f"--data_folder={SAMPLE}",
        f"--output_folder={tmp_path / 'out'}", "--device=cpu", "--noprogressbar", "--number_of_epochs=1",
        "--tasks=null", "--transcripts_as_targets=True", f"--alignment_ctc={{weight: {weight}, scale: 20.0}}",
        "--test_max_new_tokens=0"])
    assert brain.train_losses and all(math.isfinite(loss) for loss in brain.train_losses)
    if weight:
        assert len(RecordsAlignment.losses) == len(brain.train_losses) and all(
            math.isfinite(loss) and loss > 0 for loss in RecordsAlignment.losses)
    else:
        assert RecordsAlignment.losses == []
