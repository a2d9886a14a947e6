"""src.metrics.greedy_decode: several prompts decoded together give what each gives alone, and what transformers'
own full forward picks token by token (the ground truth); EOS ends a row without ending the others."""
import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM

from duplex.runtime import TorchMambaRuntime
from src.metrics import greedy_decode


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = MambaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4,
                         tie_word_embeddings=False)  # untied: a random tied model repeats its last token
    return MambaForCausalLM(config).eval()


def _prompts(model, lengths, seed):
    generator = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, model.config.vocab_size, (n,), generator=generator) for n in lengths]
    with torch.no_grad():
        return [model.backbone.embeddings(row) for row in ids]  # (L_i, H) each


def _greedy_by_full_forward(model, prompt, max_new_tokens, eos_id):
    """The slow definition: the whole sequence through transformers' forward for every new token."""
    embeds, ids = prompt[None], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(inputs_embeds=embeds).logits[0, -1].argmax())
            if token == eos_id:
                break
            ids.append(token)
            embeds = torch.cat([embeds, model.backbone.embeddings(torch.tensor([[token]]))], dim=1)
    return ids


def test_batched_greedy_equals_each_prompt_alone_and_the_full_forward(hf_model):
    runtime = TorchMambaRuntime(hf_model)
    prompts = _prompts(hf_model, [5, 11, 1, 8], seed=1)
    together = greedy_decode(runtime, prompts, max_new_tokens=9, eos_id=-1)  # no EOS: every row runs 9 tokens
    alone = [greedy_decode(runtime, [prompt], max_new_tokens=9, eos_id=-1)[0] for prompt in prompts]
    reference = [_greedy_by_full_forward(hf_model, prompt, 9, eos_id=-1) for prompt in prompts]
    assert together == alone == reference
    assert all(len(ids) == 9 for ids in together)
    assert any(len(set(ids)) > 1 for ids in together)  # not a model that only repeats itself


def test_eos_ends_one_row_and_the_others_go_on(hf_model):
    runtime = TorchMambaRuntime(hf_model)
    prompts = _prompts(hf_model, [6, 9, 4], seed=2)
    free = greedy_decode(runtime, prompts, max_new_tokens=8, eos_id=-1)
    row, cut = next((row, i) for row, ids in enumerate(free) for i, token in enumerate(ids)
                    if i > 0 and token not in ids[:i])  # a token this row first says after others
    eos_id = free[row][cut]
    with_eos = greedy_decode(runtime, prompts, max_new_tokens=8, eos_id=eos_id)
    assert with_eos[row] == free[row][:cut]
    assert any(len(ids) == 8 for ids in with_eos)  # another row went on to the end
    for row in range(len(prompts)):
        expected = _greedy_by_full_forward(hf_model, prompts[row], 8, eos_id)
        assert with_eos[row] == expected
        assert eos_id not in with_eos[row]
