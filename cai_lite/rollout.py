"""RL rollouts on the shared base: sample responses with one adapter, score their tokens with
another, and score whole responses with the `reward` adapter + head. Used by the ppo and rloo
stages, which then differ only in how they turn rewards into a loss.

Reads nothing from disk; `load_reward_stats()` reads `reward_model/reward_stats.json`.

    python -c "import cai_lite.rollout as r; help(r.sample)"
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from cai_lite import adapter_files, data, decode, generation, losses, models, rundir
from cai_lite.models import SharedBase


@dataclass
class Rollout:
    query: torch.Tensor  # (B, Tq) prompt ids, left-padded
    query_mask: torch.Tensor  # (B, Tq)
    response: torch.Tensor  # (B, T) response ids, right-padded after EOS
    mask: torch.Tensor  # (B, T) 1.0 on response tokens, EOS included
    ended: torch.Tensor  # (B,) True where the response ended with EOS
    prompts: list[str]  # the raw prompts
    texts: list[str]  # the decoded responses

    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt and response as one sequence.  -> ids (B, Tq+T), attention mask (B, Tq+T)"""
        return torch.cat([self.query, self.response], 1), torch.cat([self.query_mask, self.mask.long()], 1)

    def select(self, idx: torch.Tensor) -> Rollout:
        i = idx.tolist()
        return Rollout(self.query[idx], self.query_mask[idx], self.response[idx], self.mask[idx], self.ended[idx],
                       [self.prompts[k] for k in i], [self.texts[k] for k in i])


@torch.no_grad()
def sample(base: SharedBase, adapter: str, prompts: list[str], max_new_tokens: int, temperature: float,
           max_prompt_tokens: int, batch_size: int) -> Rollout:
    """One sampled response per prompt (repeat prompts for several), with the adapter `adapter`,
    `batch_size` rows in flight (decode.py), each row with its own seed from torch's generator."""
    if not isinstance(batch_size, int):
        raise ValueError(f"ppo.rollout_batch_size={batch_size!r}: pipeline.resolve_auto(cfg) turns auto into a "
                         "number before a stage runs")
    tok = base.tokenizer
    rendered = [data.render(tok, [{"role": "user", "content": p}]) for p in prompts]
    enc, _ = generation.tokenize_left(base, rendered, max_prompt_tokens)
    ids = [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])]
    eos = models.eos_ids(base)
    # Pure sampling from pi/T: no top-k/top-p or repetition penalty from the model's generation_config
    # (Qwen2.5 sets one), or the log-prob ratios and the KL estimate would be of another distribution.
    pure = decode.Sampling(temperature, top_p=1.0, top_k=0)
    with models.role(base, adapter) as model:
        rows, _ = decode.decode(model, ids, max_new_tokens=max_new_tokens, eos=eos, pad=tok.pad_token_id,
                                slots=batch_size, sampling=pure, seeds=generation.row_seeds(len(ids)),
                                device=base.device, progress=False)
    width = max(len(r) for r in rows)
    out = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows], device=base.device)  # (B, T)
    resp, mask, ended = cut_at_eos(out, eos, tok.pad_token_id)
    texts = [tok.decode(r[m.bool()], skip_special_tokens=True).strip() for r, m in zip(resp, mask)]
    return Rollout(enc["input_ids"], enc["attention_mask"], resp, mask, ended, list(prompts), texts)


def cut_at_eos(resp: torch.Tensor, eos: list[int], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep each row up to and including its first EOS (any id in `eos`); pad the rest.
    resp (B, T) -> response (B, T), mask (B, T) 1.0 on kept tokens, ended (B,) bool"""
    is_eos = torch.isin(resp, torch.tensor(eos, device=resp.device))
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return resp.masked_fill(after_eos, pad), (~after_eos).float(), is_eos.any(1)


def missing_eos(completion_ids: list[list[int]], eos: list[int]) -> list[bool]:
    """Which completions stopped at the length cap rather than at an end-of-turn token."""
    return [not ids or ids[-1] not in eos for ids in completion_ids]


def response_hidden(model, ro: Rollout) -> torch.Tensor:
    """Final (normed) hidden states that predict each response token, under whatever adapter is active,
    from the decoder alone: the LM head is applied later, in chunks (`losses.chunked_logprobs`).
    Assumes logits = lm_head(hidden), as in Llama and Qwen (not Gemma's soft-capping).  -> (B, T, H)"""
    ids, mask = ro.full()
    T = ro.response.shape[1]
    out = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=generation.positions(mask),
                              use_cache=False)
    return out.last_hidden_state[:, -T - 1:-1, :]  # position t predicts token t+1


def response_logprobs_entropy(model, ro: Rollout, temperature: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(response tokens) (with gradients, if enabled) and the entropy of each next-token
    distribution (detached), under whatever adapter is active, at the sampling temperature so that
    log-probs match the distribution that sampled them. The vocabulary-sized logits exist only
    `chunk` rows (batch x positions) at a time.  -> (B, T), (B, T)"""
    hidden = response_hidden(model, ro)  # (B, T, H)
    return losses.chunked_logprobs(hidden, model.get_output_embeddings(), ro.response, temperature, chunk)


def response_logprobs(base: SharedBase, adapter: str, ro: Rollout, temperature: float,
                      batch_size: int, chunk: int) -> torch.Tensor:
    """log p(response tokens) under a frozen adapter, `batch_size` sequences at a time.  -> (B, T)"""
    out = []
    with torch.no_grad(), models.role(base, adapter) as model:
        for i in range(0, len(ro.texts), batch_size):
            part = ro.select(torch.arange(i, min(i + batch_size, len(ro.texts))))
            out.append(response_logprobs_entropy(model, part, temperature, chunk)[0])
    return torch.cat(out) * ro.mask


def values(base: SharedBase, ro: Rollout) -> torch.Tensor:
    """V(s_t) from the `value` adapter + head, for the state before each response token.  -> (B, T)"""
    ids, mask = ro.full()
    Tq = ro.query.shape[1]
    v = token_values(base, "value", ids, mask)  # (B, Tq+T)
    return v[:, Tq - 1:-1]


def last_hidden(base: SharedBase, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states of the decoder under the active adapter, skipping the LM head:
    for a 150k vocabulary the logits would cost far more memory than the scores need.  -> (B, T, H)"""
    model = base.model.get_base_model() if base.adapters else base.model  # the transformers model under PEFT
    decoder = model.get_decoder()
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # skip left padding, as generate() does
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
    return out.last_hidden_state


def sequence_scores(base: SharedBase, head: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar score of each sequence at its last real token (inputs left-padded).  -> (B,)"""
    hidden = last_hidden(base, input_ids, attention_mask)  # (B, T, H)
    return base.heads[head](hidden[:, -1, :].float()).squeeze(-1)  # left padding puts the last token at T-1


def token_values(base: SharedBase, head: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-position scalar (the PPO value estimate V(s_t)).  -> (B, T)"""
    hidden = last_hidden(base, input_ids, attention_mask)  # (B, T, H)
    return base.heads[head](hidden.float()).squeeze(-1)


def reward_text(tokenizer, prompt: str, response: str) -> str:
    """What the reward model reads: the exchange through the chat template, closed like a finished turn.
    The reward_model stage trains on exactly this rendering."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                         tokenize=False)


def score(base: SharedBase, prompts: list[str], responses: list[str], batch_size: int,
          max_tokens: int) -> torch.Tensor:
    """Raw reward-model scores of (prompt, response) pairs.  -> (B,)"""
    return score_texts(base, [reward_text(base.tokenizer, p, r) for p, r in zip(prompts, responses)], batch_size,
                       max_tokens)


@torch.no_grad()
def score_texts(base: SharedBase, texts: list[str], batch_size: int, max_tokens: int) -> torch.Tensor:
    """Raw reward-model scores of rendered conversations.  -> (B,)"""
    out = []
    with models.role(base, "reward"), models.eval_mode(base):  # LoRA dropout off, whatever mode the caller is in
        for chunk in data.chunks(texts, batch_size):
            enc, _ = generation.tokenize_left(base, chunk, max_tokens)
            out.append(sequence_scores(base, "reward", enc["input_ids"], enc["attention_mask"]))
    return torch.cat(out)


def load_reward_stats(run_dir: Path) -> dict:
    """Mean and std of the reward model's scores on its training responses, for normalisation.
    A missing or damaged file raises data.DataError naming it: RL would otherwise divide by garbage."""
    path = rundir.stage_dir(run_dir, "reward_model") / "reward_stats.json"
    redo = "; rerun the reward model with force=[reward_model]"
    try:
        stats = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise data.DataError(f"{path}: file not found{redo}") from None
    except json.JSONDecodeError as e:
        raise data.DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}){redo}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise data.DataError(f"{path}: cannot read it ({type(e).__name__}: {e}){redo}") from None
    if not isinstance(stats, dict):
        raise data.DataError(f"{path}: expected a JSON object with mean and std{redo}")
    for key in ("mean", "std"):
        v = stats.get(key)
        # bool is an int in Python; json gives NaN/Infinity as floats.
        if type(v) not in (int, float) or not math.isfinite(v) or (key == "std" and v < 0):
            want = "a finite number >= 0" if key == "std" else "a finite number"
            raise data.DataError(f"{path}: {key} must be {want} (got {v!r}){redo}")
    return stats


def load_roles(base: SharedBase, run_dir: Path) -> None:
    """Load what RL needs onto the base: `sft`, its frozen copy `reference`, and `reward` (+ head)."""
    adapter_files.load_adapter(base, "sft", rundir.adapter_dir(run_dir, "sft"))
    adapter_files.load_adapter(base, "reward", rundir.adapter_dir(run_dir, "reward_model"))
    models.copy_adapter(base, "sft", "reference")  # the KL anchor is the SL-CAI model, not the bare base
