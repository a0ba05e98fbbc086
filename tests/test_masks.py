"""Masks, checked position by position: which response tokens RL scores (up to and including the
first EOS), which positions predict which token, and which tokens SFT puts its loss on (the
revision, never the prompt). Generation is replaced by fixed token ids where the model's choice
does not matter; the alignment of padded batches is checked on the tiny NF4 model itself.

    python -m pytest tests/test_masks.py -q
"""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from cai_lite import adapter_files, data, decode, generation, models, rollout
from cai_lite.stages import sft

from conftest import tiny_config

EOS, PAD = 2, 0  # the tiny tokenizer's <|im_end|> and padding ids


def test_cut_at_eos_keeps_the_first_eos_and_pads_after_it():
    resp = torch.tensor([[5, 6, EOS, 7, EOS],   # ends at position 2: the EOS is scored, what follows is not
                         [EOS, 9, 9, 9, 9],     # ends at once
                         [5, 6, 7, 8, 9]])      # hit the length cap
    out, mask, ended = rollout.cut_at_eos(resp, [EOS], PAD)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert out.tolist() == [[5, 6, EOS, PAD, PAD], [EOS, PAD, PAD, PAD, PAD], [5, 6, 7, 8, 9]]
    assert ended.tolist() == [True, True, False] and mask.dtype == torch.float32


class _Decodes:
    """Stands in for decode.decode in rollout.sample: fixed generated ids per prompt, as the loop
    returns them (each row stops at its EOS), and the arguments it was called with."""

    def __init__(self, rows: list[list[int]]):
        self.rows, self.kwargs = rows, {}

    def __call__(self, model, prompts, **kwargs):
        self.prompts, self.kwargs = prompts, kwargs
        return [list(r) for r in self.rows[: len(prompts)]], None


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def test_sample_masks_through_the_eos_and_decodes_only_the_response(tokenizer, monkeypatch):
    hello = tokenizer("hello", add_special_tokens=False)["input_ids"]
    world = tokenizer(" world", add_special_tokens=False)["input_ids"]
    w = 2 * len(world) - 1  # the second row's tokens past the first row's EOS: padding in the first row
    fake = _Decodes([hello + [EOS], hello + world + world])
    base = SimpleNamespace(tokenizer=tokenizer, device=torch.device("cpu"),
                           model=SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None)))
    used = []
    monkeypatch.setattr(models, "role", lambda b, name: used.append(name) or contextlib.nullcontext("model"))
    monkeypatch.setattr(decode, "decode", fake)
    torch.manual_seed(0)
    ro = rollout.sample(base, "policy", ["Hi", "A longer question here?"], 9, 0.7, 512, 2)
    n = len(hello)
    assert used == ["policy"]
    assert ro.mask.tolist() == [[1.0] * (n + 1) + [0.0] * w, [1.0] * (n + 1 + w)]
    assert ro.response[0].tolist() == hello + [EOS] + [PAD] * w
    assert ro.ended.tolist() == [True, False]
    assert ro.texts == ["hello", "hello world world"] and ro.prompts == ["Hi", "A longer question here?"]
    # Left-padded prompts: the shorter one starts with padding that the attention mask hides.
    assert ro.query_mask[0, 0].item() == 0 and ro.query_mask[1].tolist() == [1] * ro.query.shape[1]
    rendered = tokenizer(data.render(tokenizer, [{"role": "user", "content": "A longer question here?"}]),
                         add_special_tokens=False)["input_ids"]
    assert ro.query[1].tolist() == rendered and fake.prompts[1] == rendered  # the loop gets the prompt unpadded
    kw = fake.kwargs
    assert kw["sampling"] == decode.Sampling(0.7, top_p=1.0, top_k=0)  # pure sampling: no filter, no penalty
    assert kw["max_new_tokens"] == 9 and kw["slots"] == 2 and kw["eos"] == [EOS] and kw["pad"] == PAD
    torch.manual_seed(0)
    assert kw["seeds"] == generation.row_seeds(2) and len(set(kw["seeds"])) == 2  # one seed per row, from torch's
    # The full sequence glues prompt and response, and attends to the response only up to its EOS.
    ids, att = ro.full()
    assert ids.tolist() == torch.cat([ro.query, ro.response], 1).tolist()
    assert att[0, ro.query.shape[1]:].tolist() == [1] * (n + 1) + [0] * w
    picked = ro.select(torch.tensor([1]))
    assert picked.texts == ["hello world world"] and picked.prompts == ["A longer question here?"]
    assert torch.equal(picked.response, ro.response[1:]) and torch.equal(picked.mask, ro.mask[1:])
    assert torch.equal(picked.query, ro.query[1:]) and torch.equal(picked.ended, ro.ended[1:])


def _ro(query_mask, mask, response) -> rollout.Rollout:
    B = len(mask)
    return rollout.Rollout(torch.full((B, len(query_mask[0])), 3), torch.tensor(query_mask), torch.tensor(response),
                           torch.tensor(mask), torch.ones(B, dtype=torch.bool), ["p"] * B, ["r"] * B)


class _Logits:
    """A model whose decoder's hidden state at (row, position, unit) is 100*row_id + 10*position + unit,
    under an identity LM head (H = V = 4): the logits are those same numbers."""

    def __init__(self):
        self.calls = []

    def get_decoder(self):
        return self._decoder

    def get_output_embeddings(self):
        return torch.nn.Identity()

    def _decoder(self, input_ids, attention_mask, position_ids, use_cache):
        self.calls.append({"ids": input_ids, "mask": attention_mask, "pos": position_ids})
        B, L = input_ids.shape
        rows = input_ids[:, :1].float() * 100  # (B, 1): the first prompt id tells the rows apart
        grid = rows[:, :, None] + 10 * torch.arange(L).float()[None, :, None] + torch.arange(4).float()[None, None, :]
        return SimpleNamespace(last_hidden_state=grid)


def test_response_logits_position_t_predicts_token_t():
    model = _Logits()
    ro = _ro([[0, 1], [1, 1]], [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], [[1, 2, 0], [3, 1, 2]])
    ro.query = torch.tensor([[1, 1], [2, 2]])
    out = rollout.response_hidden(model, ro)  # (B, T, H): the logits under the identity head
    call = model.calls[0]
    assert call["ids"].tolist() == [[1, 1, 1, 2, 0], [2, 2, 3, 1, 2]]
    assert call["mask"].tolist() == [[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert call["pos"].tolist() == [[0, 0, 1, 2, 2], [0, 1, 2, 3, 4]]  # left padding skipped
    # Response token t is predicted at full position Tq - 1 + t.
    assert out.shape == (2, 3, 4)
    assert out[0, :, 0].tolist() == [100 + 10 * p for p in (1, 2, 3)]
    assert out[1, :, 3].tolist() == [200 + 10 * p + 3 for p in (1, 2, 3)]
    # Log-probs at temperature 2: every position's logits are 0..3 plus a constant, all halved.
    logp, ent = rollout.response_logprobs_entropy(model, ro, 2.0, chunk=4)  # (B, T) each
    half = torch.arange(4).float() / 2
    assert torch.allclose(logp, half[ro.response] - torch.logsumexp(half, 0), atol=1e-5)
    p = half.softmax(0)
    assert torch.allclose(ent, torch.full((2, 3), -(p * p.log()).sum().item()), atol=1e-5)


def test_response_logprobs_are_masked_and_chunked_in_order(monkeypatch):
    model = _Logits()
    monkeypatch.setattr(models, "role", lambda b, name: contextlib.nullcontext(model))
    ro = _ro([[1, 1]] * 3, [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]], [[1, 2, 3], [0, 3, 3], [2, 2, 1]])
    ro.query = torch.tensor([[1, 1], [2, 2], [3, 3]])
    got = rollout.response_logprobs(None, "reference", ro, 1.0, batch_size=2, chunk=2)
    assert [c["ids"].shape[0] for c in model.calls] == [2, 1]
    # Every position's logits are 0..3 plus a constant, so log p(token k) = k - logsumexp(0..3).
    lse = torch.logsumexp(torch.arange(4).float(), 0).item()
    want = [[1 - lse, 2 - lse, 0.0], [0 - lse, 0.0, 0.0], [2 - lse, 2 - lse, 1 - lse]]
    assert torch.allclose(got, torch.tensor(want), atol=1e-5)


def test_values_are_read_at_the_state_before_each_response_token(monkeypatch):
    seen = {}

    def token_values(base, head, ids, mask):
        seen["head"] = head
        return torch.arange(ids.shape[1]).float().expand(ids.shape[0], -1) * 10  # (B, Tq+T)

    monkeypatch.setattr(rollout, "token_values", token_values)
    ro = _ro([[1, 1, 1]], [[1.0, 1.0]], [[4, 5]])
    v = rollout.values(None, ro)
    assert seen["head"] == "value" and v.tolist() == [[20.0, 30.0]]  # positions Tq-1 and Tq


def test_reward_text_and_scores_are_pairwise(tokenizer, monkeypatch):
    text = rollout.reward_text(tokenizer, "hi", "yo")
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    seen = {}
    monkeypatch.setattr(rollout, "score_texts", lambda b, texts, bs, n: seen.update(texts=texts, bs=bs, n=n) or
                        torch.zeros(len(texts)))
    rollout.score(SimpleNamespace(tokenizer=tokenizer), ["a", "b"], ["x", "y"], 3, 99)
    assert seen == {"texts": [rollout.reward_text(tokenizer, "a", "x"), rollout.reward_text(tokenizer, "b", "y")],
                    "bs": 3, "n": 99}


def test_reward_stats_and_roles_come_from_the_run_dir(tmp_path, monkeypatch):
    (tmp_path / "reward_model").mkdir()
    (tmp_path / "reward_model" / "reward_stats.json").write_text(json.dumps({"mean": 1.5, "std": 0.25}))
    assert rollout.load_reward_stats(tmp_path) == {"mean": 1.5, "std": 0.25}
    calls = []
    monkeypatch.setattr(adapter_files, "load_adapter", lambda b, name, folder: calls.append(("load", name, folder)))
    monkeypatch.setattr(models, "copy_adapter", lambda b, src, dst: calls.append(("copy", src, dst)))
    rollout.load_roles(None, tmp_path)
    assert calls == [("load", "sft", tmp_path / "sft" / "adapter"),
                     ("load", "reward", tmp_path / "reward_model" / "adapter"), ("copy", "sft", "reference")]


def test_scores_ignore_left_padding_and_batching(nf4_base):
    """A sequence's reward-model score and values are the same alone and beside a longer one."""
    base = nf4_base
    if "reward" not in base.adapters:
        models.add_adapter(base, "reward")
    models.add_head(base, "reward")
    with torch.no_grad():
        base.heads["reward"].weight.normal_(0, 1.0)
    texts = ["short one", "a much longer sequence of several words than the first"]
    alone = rollout.score_texts(base, texts[:1], 4, 64)
    both = rollout.score_texts(base, texts, 4, 64)
    one_by_one = rollout.score_texts(base, texts, 1, 64)
    assert torch.allclose(both[:1], alone, atol=1e-4) and torch.allclose(both, one_by_one, atol=1e-4)
    assert both[0].item() != pytest.approx(both[1].item(), abs=1e-3)
    enc, _ = generation.tokenize_left(base, texts, 64)
    with models.role(base, "reward"), torch.no_grad():
        v = rollout.token_values(base, "reward", enc["input_ids"], enc["attention_mask"])  # (2, L)
        s = rollout.sequence_scores(base, "reward", enc["input_ids"], enc["attention_mask"])
        n = int(enc["attention_mask"][0].sum())
        short, _ = generation.tokenize_left(base, texts[:1], 64)
        v_alone = rollout.token_values(base, "reward", short["input_ids"], short["attention_mask"])
    assert v.shape == enc["input_ids"].shape and torch.allclose(s, v[:, -1], atol=1e-5)
    assert torch.allclose(v[0, -n:], v_alone[0], atol=1e-4)  # the real tokens, at their own positions


def test_sft_loss_is_on_the_revision_only(tmp_path, tiny_llama, nf4_base, monkeypatch):
    cfg = tiny_config(tmp_path / "sft", tiny_llama, "sft.max_steps=1", "sft.batch_size=2")
    prompts = ["How do I pick a lock?", "Say something rude."]
    revisions = ["I can't help with that, but a locksmith can.", "I'd rather be kind."]
    rows = [{"id": f"r{i}", "type": "harmless", "prompt": [{"role": "user", "content": p}], "init_response": "sure",
             "revision_response": rev, "rounds": [{"principle_id": "harm", "critique": "c", "revision": rev}],
             "completion": [{"role": "assistant", "content": rev}]} for i, (p, rev) in enumerate(zip(prompts, revisions))]
    (cfg.path / "critique_revise").mkdir(parents=True)
    data.write_shard(data.shard_path(cfg.path / "critique_revise", 0), rows)
    (cfg.path / "sft").mkdir()
    caught = []

    class Stop(Exception):
        pass

    class Spy(sft.SFTTrainer):
        def train(self, *a, **k):
            caught.append(self)
            raise Stop

    monkeypatch.setattr(sft, "SFTTrainer", Spy)
    with pytest.raises(Stop):
        sft.run(cfg, nf4_base, cfg.path / "sft")
    trainer = caught[0]
    tok = nf4_base.tokenizer
    examples = [{k: v for k, v in e.items() if k not in ("prompt", "completion")} for e in trainer.train_dataset]
    assert len(examples) == 2
    batch = trainer.data_collator(examples)
    for k, e in enumerate(examples):
        ids = list(e["input_ids"])
        i = next(i for i, p in enumerate(prompts) if p in tok.decode(ids))
        prompt_ids = tok(data.render(tok, [{"role": "user", "content": prompts[i]}]), add_special_tokens=False)["input_ids"]
        n = len(prompt_ids)
        assert ids[:n] == prompt_ids  # the prompt, as the chat template renders it, comes first
        labels = batch["labels"][k].tolist()
        # Position by position: -100 on every prompt token, the token itself on every revision token.
        assert labels[:n] == [-100] * n
        assert labels[n:len(ids)] == ids[n:]
        assert tok.decode(ids[n:]).startswith(revisions[i])
        assert labels[len(ids):] == [-100] * (len(labels) - len(ids))  # padding
