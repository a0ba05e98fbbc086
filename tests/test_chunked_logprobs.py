"""Chunked log-probs equal the full-vocabulary ones: `losses.chunked_logprobs` against `token_logprobs`
and `entropy` on whole (B, T, V) logits, first on a plain linear head, then through the tiny NF4 model
with a LoRA adapter, gradients w.r.t. the adapter included. The old path (the model's own forward,
all T logits at once) is the reference: chunking must change memory, never the numbers.

    python -m pytest -q tests/test_chunked_logprobs.py
"""

from __future__ import annotations

import pytest
import torch

from cai_lite import generation, losses, models, rollout


@pytest.mark.parametrize("chunk", [1, 3, 10, 64])  # one row, rows split mid-sequence, exactly B*T, more than B*T
def test_chunked_logprobs_equal_full_logits(chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 5, 8, requires_grad=True)  # (B, T, H)
    tokens = torch.randint(0, 11, (2, 5))  # (B, T)
    w = torch.randn(2, 5)  # (B, T) a loss that weighs every position differently

    logits = head(hidden).float() / 0.7  # (B, T, V)
    want_lp, want_ent = losses.token_logprobs(logits, tokens), losses.entropy(logits.detach())
    (want_lp * w).sum().backward()
    want_gh, want_gw = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None

    lp, ent = losses.chunked_logprobs(hidden, head, tokens, 0.7, chunk)
    (lp * w).sum().backward()
    assert not ent.requires_grad  # a diagnostic: PPO logs it, nothing trains on it
    torch.testing.assert_close(lp, want_lp, rtol=0, atol=1e-6)
    torch.testing.assert_close(ent, want_ent, rtol=0, atol=1e-6)
    torch.testing.assert_close(hidden.grad, want_gh, rtol=0, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, want_gw, rtol=0, atol=1e-6)


def _full(model, ro: rollout.Rollout, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The unchunked reference: the model's own forward, all response logits at once.  -> (B, T), (B, T)"""
    ids, mask = ro.full()
    T = ro.response.shape[1]
    out = model(input_ids=ids, attention_mask=mask, position_ids=generation.positions(mask), use_cache=False,
                logits_to_keep=T + 1)
    logits = out.logits[:, :-1, :].float() / temperature  # (B, T, V): position t predicts token t+1
    return losses.token_logprobs(logits, ro.response), losses.entropy(logits.detach())


def test_chunked_logprobs_and_lora_gradients_match_the_full_forward(nf4_base):
    base = nf4_base
    models.add_adapter(base, "chunked")
    torch.manual_seed(1)
    params = models.adapter_parameters(base, "chunked")
    with torch.no_grad():
        for p in params:  # LoRA B starts at zero, which would leave every A gradient zero
            p.add_(0.05 * torch.randn_like(p))
    V = base.model.get_output_embeddings().weight.shape[0]
    query = torch.randint(3, V, (3, 5))  # (B, Tq)
    query_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])  # left padding
    response = torch.randint(3, V, (3, 4))  # (B, T)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    ro = rollout.Rollout(query, query_mask, response, mask, torch.ones(3, dtype=torch.bool), ["p"] * 3, ["r"] * 3)
    w = torch.randn(3, 4) * mask  # (B, T)

    with models.role(base, "chunked", trainable=True) as model:
        want_lp, want_ent = _full(model, ro, 0.7)
        (want_lp * w).sum().backward()
        want = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        lp, ent = rollout.response_logprobs_entropy(model, ro, 0.7, chunk=5)  # chunks split sequences
        (lp * w).sum().backward()
        got = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
    frozen = rollout.response_logprobs(base, "chunked", ro, 0.7, batch_size=2, chunk=3)  # no-grad path, (B, T)
    models.delete_adapter(base, "chunked")

    diffs = {"logp": (lp - want_lp).abs().max().item(), "entropy": (ent - want_ent).abs().max().item(),
             "frozen logp": ((frozen - want_lp) * mask).abs().max().item(),
             "grad": max((g - h).abs().max().item() for g, h in zip(got, want)),
             "grad scale": max(h.abs().max().item() for h in want)}
    print(diffs)  # shown with -s: the report quotes these
    assert diffs["grad scale"] > 1e-3  # the comparison is not between two zeros
    assert diffs["logp"] <= 1e-5 and diffs["entropy"] <= 1e-5 and diffs["frozen logp"] <= 1e-5
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)
