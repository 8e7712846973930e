"""The chunked head loss with Gemma-2's logit soft cap: the same losses and gradients as the model's own capped logits
through `F.cross_entropy`, so Gemma-2 trains without forming its [T, 256k] logits."""

import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

from lorafleet.executor import loss
from lorafleet.executor.data import IGNORE_INDEX
from lorafleet.executor.loss import chunked_head_loss_applies, logit_softcap, token_losses

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, vocab_size=97, query_pre_attn_scalar=8, sliding_window=16)


def tiny_gemma2(dtype, cap):
    torch.manual_seed(0)
    config = Gemma2Config(**TINY, final_logit_softcapping=cap, attn_implementation="eager")
    model = Gemma2ForCausalLM(config).to(dtype)
    with torch.no_grad():  # logits of a few tens, where the cap bends them (random init gives ~0.1)
        model.lm_head.weight.mul_(200)
    model.requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)  # a parameter before the head, to compare gradients through it
    return model


def losses_and_grad(model, ids, targets, chunked):
    model.model.norm.weight.grad = None
    if chunked:
        hidden = model.model(ids).last_hidden_state[0]
        losses = token_losses(hidden, model.lm_head.weight, targets, logit_softcap(model))
    else:
        losses = F.cross_entropy(model(ids).logits[0].float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    losses.sum().backward()
    return losses.detach(), model.model.norm.weight.grad.clone()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_soft_capped_chunked_loss_equals_gemma2s_own_loss(dtype, monkeypatch):
    model = tiny_gemma2(dtype, cap=30.0)
    monkeypatch.setattr(loss, "LOGIT_CHUNK_ELEMENTS", 97 * 5)  # chunks of 5 rows: 23 rows cross chunk boundaries
    ids = torch.randint(0, 97, (1, 23), generator=torch.Generator().manual_seed(1))
    targets = torch.cat([ids[0, 1:], torch.tensor([IGNORE_INDEX])])
    targets[4] = IGNORE_INDEX
    want_losses, want_grad = losses_and_grad(model, ids, targets, chunked=False)
    got_losses, got_grad = losses_and_grad(model, ids, targets, chunked=True)
    assert model(ids).logits.abs().max() > 15  # the cap bends these logits: the test sees whether it is applied
    tolerance = dict(rtol=1e-5, atol=1e-5)  # the cross-entropy is fp32 in both (float64 logits too: kernels' contract)
    torch.testing.assert_close(got_losses, want_losses.to(got_losses.dtype), **tolerance)
    torch.testing.assert_close(got_grad, want_grad, **tolerance)


def test_gemma2_takes_the_chunked_path_with_its_cap_and_gemma3_without_one():
    gemma2 = tiny_gemma2(torch.float32, cap=30.0)
    assert chunked_head_loss_applies(gemma2) and logit_softcap(gemma2) == 30.0
    gemma3 = Gemma3ForCausalLM(Gemma3TextConfig(**TINY)).requires_grad_(False)
    assert chunked_head_loss_applies(gemma3) and logit_softcap(gemma3) is None


def test_a_cap_that_is_not_positive_is_refused():
    with pytest.raises(ValueError, match="softcap must be positive"):
        token_losses(torch.zeros(2, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long), softcap=0.0)
