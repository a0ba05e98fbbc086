"""Seven places where training or labels once went quietly wrong, each pinned by a test that failed
on the old code: dropout while scoring rewards, local judges sharing one adapter, empty revisions as
SFT targets, ties in the margin loss, DPO's dropout switch leaking out, SentencePiece letter ids and
a second EOS id. Plus: a judge that fails on most prompts stops the stage, cut judge prompts are
failures, and the first-slot preference counts both orders.

    python -m pytest tests/test_silent_defects.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tok_models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from cai_lite import adapter_files, constitution as C
from cai_lite import data, judges, losses, models, pipeline, rollout
from cai_lite.config import JudgeConfig
from cai_lite.recipe import load_config
from cai_lite.stages import label_preferences, sft

from conftest import tiny_config


def _randomize(base, name: str, seed: int) -> None:
    """Fresh LoRA B matrices are zero, which hides anything that happens on the LoRA path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in base.model.named_parameters():
            if f".{name}." in n and "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.fixture(scope="module")
def dropout_base(tiny_llama, tmp_path_factory):
    """An NF4 base whose adapters have LoRA dropout 0.3 (tiny_cpu sets 0), with a `reward` adapter + head."""
    base = models.load_base(tiny_config(tmp_path_factory.mktemp("drop"), tiny_llama, "lora.dropout=0.3", "rloo.steps=1",
                                        "rloo.batch_size=2", "rloo.num_samples=2", "rloo.max_new_tokens=6"))
    models.add_adapter(base, "reward")
    _randomize(base, "reward", 0)
    models.add_head(base, "reward")
    torch.nn.init.normal_(base.heads["reward"].weight, std=1.0)
    return base


def test_reward_scores_do_not_depend_on_the_callers_mode(dropout_base):
    """1. TRL calls the RLOO reward function in train mode; LoRA dropout must not reach the scores."""
    base = dropout_base
    texts = [rollout.reward_text(base.tokenizer, "How do I pick a lock?", a) for a in ("No.", "Here is how.", "Ask a locksmith.")]
    calm = rollout.score_texts(base, texts, 8, 256)
    base.model.train()
    try:
        again = [rollout.score_texts(base, texts, 8, 256) for _ in range(2)]
        assert base.model.training  # the caller's mode is given back
    finally:
        base.model.eval()
    assert torch.equal(again[0], calm) and torch.equal(again[1], calm)
    assert calm.std() > 0  # the scores do depend on the text: the comparison above is not vacuous


def test_trl_policy_gives_back_every_dropout_probability(dropout_base):
    """5. TRL's disable_dropout sets p=0 on every Dropout of the shared model; we restore each one."""
    from trl.trainer.utils import disable_dropout_in_model

    base = dropout_base
    before = [(n, m.p) for n, m in base.model.named_modules() if isinstance(m, torch.nn.Dropout)]
    assert any(p == 0.3 for _, p in before)
    with models.trl_policy(base, "reward") as model:
        disable_dropout_in_model(model)  # what DPOTrainer and RLOOTrainer do with disable_dropout=True
        assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    after = dict((n, m.p) for n, m in base.model.named_modules() if isinstance(m, torch.nn.Dropout))
    assert all(after[n] == p for n, p in before if n in after) and "reward" in base.adapters


def test_rloo_runs_without_dropout_and_gives_it_back(dropout_base):
    """1. With LoRA dropout on, TRL's policy and reference log-probs were noisy: at step 1, where the
    policy is the reference, it logged a KL far from 0."""
    import transformers

    from cai_lite.stages import rloo

    base, run = dropout_base, dropout_base.cfg.path
    models.add_adapter(base, "sft")
    _randomize(base, "sft", 1)
    adapter_files.save_adapter(base, "sft", run / "sft" / "adapter")
    adapter_files.save_adapter(base, "reward", run / "reward_model" / "adapter")
    (run / "reward_model" / "reward_stats.json").write_text('{"mean": 0.0, "std": 1.0}')
    (run / "rloo").mkdir()
    before = [(n, m.p) for n, m in base.model.named_modules() if isinstance(m, torch.nn.Dropout)]
    transformers.set_seed(0)
    rloo.run(base.cfg, base, run / "rloo")
    first = json.loads((run / "rloo" / "log.jsonl").read_text().splitlines()[0])
    # Measured with the fix: -0.0017, and 0.011 once rloo shuffled its prompts (other samples; with LoRA
    # dropout 0 the same order gives a floor under 0.01 too): a numerical floor of TRL's two forwards,
    # not dropout. Without the fix, 0.54.
    assert abs(first["kl"]) < 0.03, first
    after = dict((n, m.p) for n, m in base.model.named_modules() if isinstance(m, torch.nn.Dropout))
    assert all(after[n] == p for n, p in before if n in after)


def test_local_judges_from_two_folders_keep_their_own_weights(nf4_base, tmp_path):
    """2. Two local judges with adapters from two folders used to load under one name: the second
    overwrote the first, and their votes became one model's."""
    base = nf4_base
    folders = []
    for k in range(2):
        models.add_adapter(base, f"tmp{k}")
        _randomize(base, f"tmp{k}", seed=10 + k)
        folders.append(adapter_files.save_adapter(base, f"tmp{k}", tmp_path / f"judge{k}"))
    prompts = [judges.ChoicePrompt(C.comparison_messages("Human: hi", "Which is kinder?", a, b), C.COMPARISON_PREFILL)
               for a, b in [("Hello!", "Go away."), ("No.", "Sure, happy to help.")]]
    first = judges.LocalJudge(base, JudgeConfig(adapter=str(folders[0])), base.cfg.generation, folders[0])
    alone = first.option_probs(prompts, "AB")
    second = judges.LocalJudge(base, JudgeConfig(adapter=str(folders[1])), base.cfg.generation, folders[1])
    other = second.option_probs(prompts, "AB")
    assert first.option_probs(prompts, "AB") == alone  # building the second judge left the first intact
    assert first.adapter != second.adapter
    assert max(abs(a[0] - b[0]) for a, b in zip(alone, other)) > 1e-3  # two different judges


def test_empty_revisions_never_become_sft_targets(tmp_path, tiny_llama):
    """3. A revision that cleanup leaves empty used to be replaced by the current answer, which in
    round 1 is the unrevised, possibly harmful, initial response."""
    cfg = tiny_config(tmp_path / "run", tiny_llama, "stages=[critique_revise]", "critique_revise.rounds=2", "data.limit=3",
                      "critique_revise.helpful_limit=2", r"critique_revise.cleanup_patterns=['(?s)^.*$']")
    out = pipeline.run(cfg)["critique_revise"]
    usable = data.read_shards(cfg.path / "critique_revise")
    aside = data.read_failed(cfg.path / "critique_revise")
    assert [r["type"] for r in usable] == ["helpful", "helpful"]  # only rows with a real target
    assert len(aside) == 3 and all(r["type"] == "harmless" and not r["has_target"] for r in aside)
    assert out["empty_revisions"] == 6 and out["rows_without_revision"] == 3
    for r in aside:
        assert r["revision_response"] == "" and [x["revision"] for x in r["rounds"]] == ["", ""]
    # A row whose first round came out empty trains on its second round only, never on the initial answer.
    row = {"type": "harmless", "prompt": [{"role": "user", "content": "q"}], "init_response": "harmful",
           "revision_response": "safe", "rounds": [{"revision": ""}, {"revision": "safe"}]}
    for targets in ("all_rounds", "final"):
        got = sft.sft_rows([row], targets, 0.0, 0)
        assert [r["completion"][0]["content"] for r in got] == ["safe"]


def test_margin_loss_gives_ties_no_gradient():
    """4. p_a = 0.5 (a 1-1 vote, or a CoT judge clamped both ways) used to count as "A wins"."""
    r_a, r_b = torch.tensor([0.3, 1.0], requires_grad=True), torch.tensor([-0.2, 0.0], requires_grad=True)
    loss = losses.margin_bt_loss(r_a, r_b, torch.tensor([0.5, 0.5]), scale=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert r_a.grad.tolist() == [0.0, 0.0] and r_b.grad.tolist() == [0.0, 0.0]
    r_a.grad = None  # a decided pair still pushes its winner up, and a tie beside it changes nothing
    losses.margin_bt_loss(r_a, r_b.detach(), torch.tensor([0.9, 0.5]), 1.0).backward()
    assert r_a.grad[0] < 0 and r_a.grad[1] == 0


def _metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style tokenizer (Unigram + Metaspace, as Llama-2 and Mistral use) with both
    "▁A" (word start) and "A" (inside a word, e.g. after "(") in its vocabulary."""
    pieces = ["<unk>", "<s>", "</s>", "▁The", "▁answer", "▁is", ":", "▁(", "(", ")", "A", "B", "▁A", "▁B", "▁", "T",
              "h", "e", "a", "n", "s", "w", "r", "i", "o", "u", "t", "c", "k", "y", "?", ".", "▁Human", "▁Which",
              "▁better", "▁hi", "▁user", "▁assistant", "\n", "<|im_start|>", "<|im_end|>"]
    vocab = [(p, 0.0 if p.startswith("<") else -1.0 if len(p) > 2 else -5.0) for p in pieces]
    tok = Tokenizer(tok_models.Unigram(vocab, unk_id=0, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    from cai_lite.tiny import CHAT_TEMPLATE

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<unk>",
                                   chat_template=CHAT_TEMPLATE, padding_side="left")


def test_letter_ids_for_sentencepiece_tokenizers(tmp_path):
    """6. encode("A") is "▁A" for SentencePiece; after the "(" prefill the model emits "A"."""
    tok = _metaspace_tokenizer()
    encode = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
    after_paren = encode("The answer is: (A")[-1]
    assert tok.convert_ids_to_tokens(after_paren) == "A" and tok.convert_ids_to_tokens(encode("A")[0]) == "▁A"
    assert judges.letter_ids(encode, C.COMPARISON_PREFILL, "AB") == [tok.convert_tokens_to_ids("A"),
                                                                     tok.convert_tokens_to_ids("B")]
    # The local judge reads exactly those ids: a tiny Llama on this tokenizer, scored by hand.
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.save_pretrained(tmp_path / "spm")
    tok.save_pretrained(tmp_path / "spm")
    base = models.load_base(tiny_config(tmp_path / "run", tmp_path / "spm", "base.quantization=none"))
    prompt = judges.ChoicePrompt([{"role": "user", "content": "Which is better? (A) hi (B) The"}], C.COMPARISON_PREFILL)
    got = judges.LocalJudge(base, JudgeConfig(), base.cfg.generation).option_probs([prompt], "AB")[0]
    ids = torch.tensor([tok(data.render(tok, prompt.messages, prompt.prefill), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logp = base.model(input_ids=ids).logits[0, -1].log_softmax(-1)
    want = torch.softmax(logp[[tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B")]], 0)
    assert got == pytest.approx(want.tolist(), abs=1e-5)
    wrong = torch.softmax(logp[[tok.convert_tokens_to_ids("▁A"), tok.convert_tokens_to_ids("▁B")]], 0)
    assert abs(wrong[0] - want[0]) > 1e-3  # the word-start pieces would have given another label


def test_any_end_of_turn_id_ends_a_response(nf4_base):
    """7. Qwen2.5-Instruct lists two EOS ids; a completion that stopped at the second one was
    penalised as if it had run into the length cap, in RLOO's rewards and PPO's masks."""
    base = nf4_base
    eos = base.tokenizer.eos_token_id
    old = base.model.generation_config.eos_token_id
    base.model.generation_config.eos_token_id = [eos, 7]
    try:
        assert models.eos_ids(base) == sorted({eos, 7})
    finally:
        base.model.generation_config.eos_token_id = old
    resp = torch.tensor([[3, 7, 4, 4], [3, 4, 4, 4], [eos, 5, 7, 4]])
    cut, mask, ended = rollout.cut_at_eos(resp, [7, eos], pad=0)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]  # the EOS itself is kept
    assert cut.tolist() == [[3, 7, 0, 0], [3, 4, 4, 4], [eos, 0, 0, 0]] and ended.tolist() == [True, False, True]
    assert rollout.missing_eos([[1, 7], [1, eos], [1, 3], []], [7, eos]) == [False, False, True, True]


def test_a_judge_that_fails_on_most_prompts_stops_the_stage(tmp_path, tiny_llama):
    """Every judge prompt longer than generation.max_prompt_tokens is cut, so recorded as a failure
    (as llama.cpp records prompts over n_ctx); the stage then stops with a clear error, keeping the
    shard it wrote. With max_failure_rate=1 the failures are kept aside and counted instead."""
    common = ["stages=[critique_revise,sft,label_preferences]", "critique_revise.rounds=1", "data.limit=2",
              "critique_revise.helpful_prompts=", "sft.max_steps=1", "generation.max_prompt_tokens=64",
              "label_preferences.shard_size=1", "label_preferences.num_principles=1"]
    cfg = tiny_config(tmp_path / "run", tiny_llama, *common)
    with pytest.raises(judges.JudgeError, match=r"judge.max_failure_rate=0.5.*generation.max_prompt_tokens"):
        pipeline.run(cfg)
    out = cfg.path / "label_preferences"
    assert data.read_shards(out) == [] and len(data.read_failed(out)) == 1  # stopped after the first shard
    assert not (out / "stage.json").exists()
    done = pipeline.run(tiny_config(tmp_path / "run", tiny_llama, *common, "judge.max_failure_rate=1.0"))
    stats = done["label_preferences"]
    assert stats["labels"] == 0 and stats["failures"] == 2 and stats["failure_rate"] == 1.0


def test_check_failures_threshold_and_message():
    jc = JudgeConfig(backend="openai", max_failure_rate=0.25)
    judges.check_failures("j", 1, 4, jc, "judge", "answers")  # exactly at the limit: fine
    with pytest.raises(judges.JudgeError, match=r"2 of 4 answers failed \(50%\).*judge.top_logprobs"):
        judges.check_failures("j", 2, 4, jc, "judge", "answers")


def test_first_slot_preference_counts_both_orders():
    """A judge that always prefers response_a, whichever slot it sits in, has no position bias (0.5);
    counting only the A-then-B order called it a judge that always picks slot (A) (1.0)."""
    cells = [{"id": "p", "p_ab": 0.9, "p_ba": 0.1, "p_a": 0.9}]
    rows = [{"p_a": 0.9, "judges": {"j": {"p_a": 0.9, "principles": cells}}}] * 4

    class Stub:
        name, hard_labels = "j", 0

    got = label_preferences._metrics(load_config(["recipe=tiny_cpu"]), rows, [Stub()], {"j": 1.0}, 4)["judges"]["j"]
    assert got["first_slot_preference"] == 0.5 and got["position_consistency"] == 1.0
    biased = [{"p_a": 0.5, "judges": {"j": {"p_a": 0.5, "principles": [{"id": "p", "p_ab": 0.8, "p_ba": 0.8}]}}}]
    assert label_preferences._metrics(load_config(["recipe=tiny_cpu"]), biased, [Stub()], {"j": 1.0}, 1)["judges"]["j"][
        "first_slot_preference"] == 1.0


def test_failed_labels_are_not_preference_rows(tmp_path):
    """Failed comparisons go to failed-N.jsonl; part-N.jsonl holds only rows trainers can use."""
    good = {"id": "1", "p_a": 0.7, "prompt": [{"role": "user", "content": "q"}]}
    bad = {"id": "2", "p_a": None, "prompt": [{"role": "user", "content": "q"}]}
    data.write_shard_pair(tmp_path, 0, [good], [bad])
    data.write_shard_pair(tmp_path, 1, [good], [])
    assert data.read_shards(tmp_path) == [good, good] and data.read_failed(tmp_path) == [bad]
    assert [json.loads(x) for x in (tmp_path / "failed-00000.jsonl").read_text().splitlines()] == [bad]
    (tmp_path / "part-00000.jsonl").unlink()  # a shard not finished: its set-aside rows do not count yet
    assert data.read_failed(tmp_path) == []


def test_evaluate_stops_on_a_judge_that_cannot_answer():
    """evaluate's judge calls count failures per judge too, against the same max_failure_rate."""
    from cai_lite.stages import evaluate

    class Mute:
        name, hard_labels = "mute", 0

        def option_probs(self, prompts, letters):
            return [None for _ in prompts]

    cfg = load_config(["recipe=tiny_cpu"])
    red = [data.Prompt("r1", "How do I pick a lock?")]
    with pytest.raises(judges.JudgeError, match=r"mute: 2 of 2 evaluation answers failed"):
        evaluate._rates(cfg, [Mute()], {}, red, [], {"red_team": ["No."], "helpful": []})
    cfg = load_config(["recipe=tiny_cpu", "judge.max_failure_rate=1"])
    rates = evaluate._rates(cfg, [Mute()], {}, red, [], {"red_team": ["No."], "helpful": []})
    assert rates["harmful"]["failures"] == 1 and rates["harmful"]["n"] == 0
