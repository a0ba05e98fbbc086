"""Pure tensor math for the reward model and RL: no model, no config, no I/O.

Shapes: B = batch, T = response tokens, V = vocabulary, P = prompts, K = samples per prompt.
`mask` tensors are 1.0 on real response tokens (EOS included) and 0.0 on padding.

    python -c "import torch; from cai_lite.losses import soft_bt_loss; print(soft_bt_loss(torch.tensor([1.]), torch.tensor([0.]), torch.tensor([.8])))"
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1.  x, mask: (B, T) -> scalar, or (B,) with dim=1."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise x to unit variance (and zero mean) over masked positions.  (B, T) -> (B, T)"""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under logits.  logits (B, T, V), tokens (B, T) -> (B, T)"""
    return torch.gather(logits.log_softmax(-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution.  (B, T, V) -> (B, T)"""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def chunked_logprobs(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor,
                     temperature: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs` and `entropy` of head(hidden) / temperature, `chunk` rows (batch x positions) at
    a time, so no (B, T, V) tensor ever exists: with a 150k vocabulary the logits of a whole minibatch
    would outweigh the 4-bit base.  head: the LM head, (N, H) -> (N, V).
    hidden (B, T, H), tokens (B, T) -> log-probs (B, T) (differentiable), entropy (B, T) (detached)

    With gradients, autograd would keep every chunk's (chunk, V) logits for backward, so each chunk is
    checkpointed: backward recomputes its logits, and the peak holds one chunk's at a time."""
    B, T, H = hidden.shape

    def part(h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logp = (head(h).float() / temperature).log_softmax(-1)  # (n, V)
        ent = -(logp.detach().exp() * logp.detach()).sum(-1)  # (n,) a diagnostic: no gradient, as PPO logs it
        return logp.gather(1, y.unsqueeze(1)).squeeze(1), ent

    grad = torch.is_grad_enabled() and hidden.requires_grad
    logps, ents = [], []
    for h, y in zip(hidden.reshape(B * T, H).split(chunk), tokens.reshape(B * T).split(chunk)):  # (n, H), (n,)
        lp, ent = checkpoint(part, h, y, use_reentrant=False) if grad else part(h, y)
        logps.append(lp)
        ents.append(ent)
    return torch.cat(logps).view(B, T), torch.cat(ents).view(B, T)


def soft_bt_loss(r_a: torch.Tensor, r_b: torch.Tensor, p_a: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry cross-entropy against a soft label (CAI §4.1; RLAIF's distilled RM):
    -[p log s(r_a - r_b) + (1 - p) log s(r_b - r_a)], averaged.  r_a, r_b, p_a: (B,) -> scalar"""
    d = r_a - r_b
    return -(p_a * F.logsigmoid(d) + (1 - p_a) * F.logsigmoid(-d)).mean()


def hard_bt_loss(r_a: torch.Tensor, r_b: torch.Tensor, p_a: torch.Tensor) -> torch.Tensor:
    """The same loss with the label thresholded at 0.5 (ties stay 0.5).  (B,) -> scalar"""
    hard = torch.where(p_a > 0.5, 1.0, torch.where(p_a < 0.5, 0.0, 0.5)).to(r_a.dtype)
    return soft_bt_loss(r_a, r_b, hard)


def margin_bt_loss(r_a: torch.Tensor, r_b: torch.Tensor, p_a: torch.Tensor, scale: float) -> torch.Tensor:
    """Hard label with a margin that grows with the judge's confidence (Llama 2's RM margin):
    -log s(r_chosen - r_rejected - scale * |2p - 1|).  (B,) -> scalar

    An exact tie (p = 0.5: a 1-1 majority vote, or a CoT judge clamped to 0.5) has no chosen side:
    its term is the constant log 2, so it adds no gradient instead of pushing r_a up."""
    sign = torch.where(p_a > 0.5, 1.0, torch.where(p_a < 0.5, -1.0, 0.0)).to(r_a.dtype)
    margin = scale * (2 * p_a - 1).abs()
    return -F.logsigmoid(sign * (r_a - r_b) - margin).mean()


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded responses.
    rewards, values, mask: (B, T) -> advantages (B, T), returns (B, T)"""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_v = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < T else 0.0)
        adv[:, t] = last * mask[:, t]
    return adv, (adv + values) * mask


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                    clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate (Schulman et al. 2017).  (B, T) each -> loss, clip fraction (scalars)"""
    ratio = (logp - old_logp).exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float) -> torch.Tensor:
    """Clipped value loss: the new estimate may move at most `clip` from the rollout's.  (B, T) -> scalar"""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate log pi(y_t) - log ref(y_t) on the sampled tokens (k1).  (B, T) -> (B, T)"""
    return logp - ref_logp
