"""Each result belongs to its own input: generation, RL rollouts, and the stages that write one row
per prompt or pair (tests/test_belongs_to_input.py has the judges, and the stand-ins used here).
Inputs have right answers that differ and are known beforehand, so a result swapped, shifted or
reversed between inputs fails a test:
  - local generation, RL rollouts (responses, log-probs, values, rewards) and evaluate's answers run
    on a model that counts: its next token is the id after the last one, and the end of its turn
    after every multiple of 7; loaded NF4 like any base;
  - generation through a server: the stub answers with a digest of the prompt and the seed it was sent;
  - critique_revise, label_preferences and evaluate, with generation stubbed (`Recorder`) or served
    by the stub, and judges whose verdicts follow from the texts: each row must hold its own
    prompt, answers, critiques, revisions, pair and verdicts.

    python -m pytest -q tests/test_belongs_to_input_stages.py
"""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from cai_lite import constitution as C
from cai_lite import data, generation, judges, models, rollout
from cai_lite.config import GenerationSettings
from cai_lite.generation import Generated
from cai_lite.recipe import load_config
from cai_lite.stages import critique_revise, evaluate, label_preferences
from cai_lite.tiny import build_tiny_model

from conftest import tiny_config
from test_belongs_to_input import (TextJudge, assert_judgements, digest, expected_cells, expected_p_a, p_yes,
                                   worth)
from test_belongs_to_input import chatml, stub  # noqa: F401  (fixtures)
from test_critique_rows import Tok

# ---- a model that counts -----------------------------------------------------------------------

END_AFTER = 7  # the counting model ends its turn after every token id divisible by this


def count_on(t: int, tok) -> int:
    """The counting model's next token after token `t`."""
    if t % END_AFTER == 0:
        return tok.eos_token_id
    return t + 1 if t + 1 < len(tok) else len(tok.all_special_ids)


def counted(tok, prompt: str, n: int) -> tuple[list[int], bool]:
    """The counting model's answer to `prompt` in at most `n` tokens, and whether it ended its turn."""
    t, ids = tok(prompt, add_special_tokens=False)["input_ids"][-1], []
    while len(ids) < n:
        t = count_on(t, tok)
        if t == tok.eos_token_id:
            return ids, True
        ids.append(t)
    return ids, False


def answer_text(tok, prompt: str, n: int) -> str:
    return tok.decode(counted(tok, prompt, n)[0], skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def counting(tmp_path_factory) -> models.SharedBase:
    """The counting model, loaded NF4, with fresh `policy`, `reward` and `value` adapters (which change
    nothing) and reward and value heads whose score is the id of the token they read. The embedding
    is one-hot, the layer adds nothing, and the LM head puts a logit of 2 * sqrt(512) = 45 on the
    successor: greedy and sampled answers are the same. The chat template writes the user's text
    last, so the last token of the text is what picks the answer."""
    path = build_tiny_model(tmp_path_factory.mktemp("models") / "counting", hidden_size=512, num_layers=1,
                            intermediate_size=64)
    model, tok = LlamaForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert len(tok) == 512
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(512))
        model.model.layers[0].self_attn.o_proj.weight.zero_()  # the layer adds nothing to the residual stream
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for t in range(512):
            model.lm_head.weight[count_on(t, tok), t] = 2.0
    model.save_pretrained(path)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(path)
    base = models.load_base(tiny_config(tmp_path_factory.mktemp("run"), path))
    for name in ("policy", "reward", "value"):
        models.add_adapter(base, name)
    for name in ("reward", "value"):
        models.add_head(base, name)
        with torch.no_grad():
            base.heads[name].weight.copy_(torch.arange(512.0) / math.sqrt(512))  # the final norm scales by sqrt(512)
    return base


# Last tokens far apart: distinct answers, some ending within 5 tokens and some not.
ASKED = ["Tell me how to hurt someone", "hello world", "What is the capital of France", "a", "x y z q",
         "Can you help me write a poem about the sea", "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 2024"]


def test_local_generation_answers_each_prompt_in_its_own_row(counting):
    tok = counting.tokenizer
    g = GenerationSettings(batch_size=3, max_prompt_tokens=6, max_new_tokens=5, temperature=0.0)
    got = generation.generate(counting, ASKED, None, g)
    want = [counted(tok, p, 5) for p in ASKED]
    assert got.texts == [answer_text(tok, p, 5) for p in ASKED]
    assert got.ended == [ended for _, ended in want]
    assert got.truncated == [len(tok(p, add_special_tokens=False)["input_ids"]) > 6 for p in ASKED]
    assert len(set(got.texts)) == len(ASKED) and len(set(got.ended)) == len(set(got.truncated)) == 2  # not vacuous


def test_rollouts_keep_each_prompt_with_its_response_and_score(counting):
    tok, eos = counting.tokenizer, counting.tokenizer.eos_token_id
    ro = rollout.sample(counting, "policy", ASKED, 5, 1.0, 64, len(ASKED))
    want = [counted(tok, p, 5) for p in ASKED]
    assert ro.prompts == ASKED and ro.texts == [answer_text(tok, p, 5) for p in ASKED]
    assert ro.ended.tolist() == [ended for _, ended in want]
    for i, (ids, ended) in enumerate(want):
        assert ro.response[i][ro.mask[i].bool()].tolist() == ids + [eos] * ended
        assert ro.query[i][ro.query_mask[i].bool()].tolist() == tok(ASKED[i], add_special_tokens=False)["input_ids"]
    order = torch.tensor([4, 0, 6, 2, 5, 1, 3])
    picked = ro.select(order)
    assert picked.prompts == [ASKED[i] for i in order] and picked.texts == [ro.texts[i] for i in order]
    for field in ("query", "query_mask", "response", "mask", "ended"):
        assert torch.equal(getattr(picked, field), getattr(ro, field)[order]), field
    # Responses moved to other prompts score -45 at their first token, in their own rows (2 per batch).
    moved = [0, 3, 2, 1, 4, 6, 5]
    mixed = rollout.Rollout(ro.query, ro.query_mask, ro.response[moved], ro.mask[moved], ro.ended[moved], ro.prompts,
                            [ro.texts[i] for i in moved])
    logp = rollout.response_logprobs(counting, "policy", mixed, 1.0, 2, chunk=3).sum(1)
    assert [bool(x > -1e-3) for x in logp] == [i == k for i, k in enumerate(moved)] and logp.min() < -40
    # V(s_t) is read in the state before each response token: the prompt's last token, then the response's.
    values = rollout.values(counting, ro)  # (B, T)
    for i, (ids, ended) in enumerate(want):
        before = tok(ASKED[i], add_special_tokens=False)["input_ids"][-1:] + ids + [eos] * ended
        assert values[i][ro.mask[i].bool()].round().tolist() == before[:-1]
    # The reward model reads each (prompt, response) pair: here its score is the pair's last token id.
    answers = ["Sure, here is how", "No", "The capital is Paris", "I can't help with that", "ok then", "why not",
               "The sea is wide and blue"]
    last = [tok(rollout.reward_text(tok, p, a), add_special_tokens=False)["input_ids"][-1]
            for p, a in zip(ASKED, answers)]
    assert rollout.score(counting, ASKED, answers, 2, 64).round().tolist() == last and len(set(last)) == len(last)


def test_evaluate_answers_each_prompt_locally(counting):
    red = [data.Prompt(f"r{i}", p) for i, p in enumerate(ASKED[:4])]
    helpful = [data.Prompt(f"h{i}", p) for i, p in enumerate(ASKED[4:])]
    got = evaluate._responses(counting.cfg, counting, {"base": None, "policy": "policy"}, red, helpful)
    n = counting.cfg.evaluate.max_new_tokens
    for model in ("base", "policy"):
        assert got[model] == {"red_team": [answer_text(counting.tokenizer, p.text, n) for p in red],
                              "helpful": [answer_text(counting.tokenizer, p.text, n) for p in helpful]}


def test_server_generation_answers_each_prompt_from_its_own_request(stub, chatml):
    stub.bodies.clear()
    stub.answer = lambda body: {"choices": [{"text": f" {body['model']} {body['seed']} {digest(body['prompt'])} ",
                                             "finish_reason": "stop" if worth(body["prompt"]) > 0 else "length"}]}
    g = GenerationSettings(backend="openai", base_url=stub.url, adapters=["sft=cai-sft"], concurrency=4,
                           max_prompt_tokens=12, retries=0)
    prompts = [f"Question {i}: why" + " and why" * (i % 5) + "?" for i in range(12)]
    got = generation.sample(SimpleNamespace(tokenizer=chatml), prompts, "sft", g)
    sent = {body["seed"]: body["prompt"] for body in stub.bodies}  # each request's seed is the first one + its index
    first = min(sent)
    assert sorted(sent) == list(range(first, first + len(prompts)))
    for i, prompt in enumerate(prompts):
        text = sent[first + i]
        assert got.truncated[i] == (len(chatml(prompt, add_special_tokens=False)["input_ids"]) > 12)
        assert text == prompt if not got.truncated[i] else len(text) < len(prompt) and prompt.endswith(text)
        assert got.texts[i] == f"cai-sft {first + i} {digest(text)}" and got.ended[i] == (worth(text) > 0)
    assert len(set(got.ended)) == len(set(got.truncated)) == 2  # not vacuous


# ---- critique_revise: prompt, answer, critique, revision -------------------------------------------

class Recorder:
    """Stands in for generation.generate: each text is `[<what> <n>]`, what was asked (answers,
    critiques, revisions, responses) and n its index in `asked`, which keeps what was asked and of
    which prompt. A prompt holding `mute` gets an empty first revision; one holding `broken` is
    answered with FAIL, which the stand-in judges cannot judge."""

    def __init__(self):
        self.asked: list[tuple[str, str]] = []

    def __call__(self, base, prompts, adapter, g, max_new_tokens=None, temperature=None, desc="generate"):
        texts = []
        for p in prompts:
            first_mute = desc == "revisions" and "mute" in p and not any(d == desc and "mute" in q
                                                                        for d, q in self.asked)
            self.asked.append((desc, p))
            texts.append("" if first_mute else f"[{desc} {len(self.asked) - 1}]" + " FAIL" * ("broken" in p))
        return Generated(texts, [True] * len(texts), [False] * len(texts))

    def __getitem__(self, text: str) -> tuple[str, str]:
        """What was asked, and of which prompt, for the generated `text`."""
        return self.asked[int(text.split("]")[0].split()[-1])]


def _prompt_file(path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return str(path)


RED = ["How do I pick the alpha lock?", "Tell me how to hurt bravo", "Insult charlie for me", "mute delta now",
       "broken echo request"]
HELPFUL = ["Bake foxtrot bread", "Write a golf poem"]


def test_critique_revise_rows_hold_their_own_prompt_answer_critique_and_revision(tmp_path, monkeypatch):
    cfg = load_config(["recipe=tiny_cpu", f"run_dir={tmp_path / 'run'}", "data.limit=0", "data.eval_prompts=0",
                       f"data.prompts={_prompt_file(tmp_path / 'r.jsonl', RED)}", "critique_revise.rounds=2",
                       "critique_revise.few_shot=0", "critique_revise.shard_size=3", "critique_revise.helpful_limit=0",
                       f"critique_revise.helpful_prompts={_prompt_file(tmp_path / 'h.jsonl', HELPFUL)}"])
    gen = Recorder()
    monkeypatch.setattr(generation, "generate", gen)
    out = cfg.path / "critique_revise"
    out.mkdir(parents=True)
    critique_revise.run(cfg, SimpleNamespace(tokenizer=Tok()), out)
    rows = data.read_shards(out) + data.read_failed(out)
    assert sorted(r["init_prompt"] for r in rows) == sorted(RED + HELPFUL)
    for r in rows:
        user = r["init_prompt"]
        assert r["type"] == ("helpful" if user in HELPFUL else "harmless")
        assert gen[r["init_response"]] == ("answers", user)
        current, last = r["init_response"], None
        for step in r["rounds"]:  # each critique is of this row's latest answer; each revision follows it
            asked, prompt = gen[step["critique"]]
            assert asked == "critiques" and user in prompt and current in prompt, (r["id"], step)
            if step["revision"]:
                asked, prompt = gen[step["revision"]]
                assert asked == "revisions" and user in prompt and current in prompt and step["critique"] in prompt
                current, last = step["revision"], step
        assert len(r["rounds"]) == (2 if r["type"] == "harmless" else 0)
        assert r["revision_response"] == current and r["critic_response"] == (last["critique"] if last else "")
        assert r["prompt"] == [{"role": "user", "content": user}] and r["messages"] == r["prompt"] + r["completion"]
        assert r["completion"] == r["chosen"] == [{"role": "assistant", "content": current}]
        assert r["rejected"] == [{"role": "assistant", "content": r["init_response"]}]
    assert [x["revision"] for r in rows if "mute" in r["init_prompt"] for x in r["rounds"]][0] == ""  # not vacuous


# ---- label_preferences: pairs, prompts, verdicts ----------------------------------------------------

def test_label_rows_hold_their_own_prompt_pair_and_verdicts(tmp_path, monkeypatch):
    cfg = load_config(["recipe=tiny_cpu", f"run_dir={tmp_path / 'run'}", "judges=[local,local]",
                       "judge.max_failure_rate=0.5", "label_preferences.num_responses=3",
                       "label_preferences.shard_size=3",
                       f"label_preferences.prompts={_prompt_file(tmp_path / 'r.jsonl', RED)}",
                       f"label_preferences.helpful_prompts={_prompt_file(tmp_path / 'h.jsonl', HELPFUL)}",
                       "label_preferences.helpful_limit=0"])
    gen, salts = Recorder(), {"j1": "", "j2": "2"}
    monkeypatch.setattr(generation, "generate", gen)
    monkeypatch.setattr(label_preferences.adapter_files, "load_adapter", lambda *a, **k: None)
    monkeypatch.setattr(label_preferences.judges, "build",
                        lambda cfg, base: [TextJudge(n, salt=s) for n, s in salts.items()])
    out = cfg.path / "label_preferences"
    out.mkdir(parents=True)
    label_preferences.run(cfg, SimpleNamespace(tokenizer=Tok()), out)
    const, pairs = C.load(cfg.constitution), []
    failed = data.read_failed(out)
    for r in data.read_shards(out) + failed:
        user = r["prompt"][0]["content"]
        assert r["prompt"] == [{"role": "user", "content": user}]
        # Two of this very prompt's samples, in the order they were drawn: sample i and sample j > i.
        samples = [f"[responses {n}]" + " FAIL" * ("broken" in user) for n, (_, q) in enumerate(gen.asked) if q == user]
        i, j = samples.index(r["response_a"]), samples.index(r["response_b"])
        pairs.append((user, i, j))
        helpful = user in HELPFUL
        assert r["type"] == ("helpful" if helpful else "harmless")
        principles = [C.HELPFUL_PRINCIPLE] if helpful else \
            C.sample(const.preference, 2, C.rng_for(cfg.seed, f"{r['id'].rsplit(':', 1)[0]}:{i}:{j}"))
        comp = judges.Comparison(data.conversation_text(user), r["response_a"], r["response_b"], principles)
        for name, salt in salts.items():
            mine = r["judges"][name]
            assert_judgements([comp], [judges.Judgement(mine["p_a"], mine["principles"])], True, salt=salt)
        want = [expected_p_a(expected_cells(comp, True, salt=s)) for s in salts.values()]
        assert r["p_a"] == (None if None in want else pytest.approx(sum(want) / 2, abs=1e-12))
        better, worse = (r["response_a"], r["response_b"]) if r["p_a"] is None or r["p_a"] >= 0.5 else \
            (r["response_b"], r["response_a"])
        assert (r["chosen"], r["rejected"]) == ([{"role": "assistant", "content": better}],
                                                [{"role": "assistant", "content": worse}])
    assert sorted(pairs) == sorted((u, i, j) for u in RED + HELPFUL for i, j in itertools.combinations(range(3), 2))
    assert {r["prompt"][0]["content"] for r in failed} == {"broken echo request"} and len(failed) == 3


# ---- evaluate: answers, verdicts, win rates, rates --------------------------------------------------

def test_evaluate_pairs_each_prompt_with_its_answers_and_verdicts(stub, chatml, tmp_path, monkeypatch):
    """The whole stage, answers from the server stub: every model's answer is a digest of its prompt
    under the model's served name; two judges that disagree vote; every number is worked out here."""
    served = {"base": "cai-base", "sft": "cai-sft", "ppo": "cai-ppo"}
    cfg = load_config(["recipe=tiny_cpu", f"run_dir={tmp_path / 'run'}", "generation.backend=openai",
                       f"generation.base_url={stub.url}", "generation.model=cai-base", "generation.concurrency=3",
                       "generation.adapters=[sft=cai-sft, ppo=cai-ppo]", "judges=[local,local]",
                       "evaluate.bootstrap=20",
                       f"evaluate.prompts={_prompt_file(tmp_path / 'r.jsonl', RED)}", "evaluate.helpful_limit=0",
                       f"evaluate.helpful_prompts={_prompt_file(tmp_path / 'h.jsonl', HELPFUL + ['Name a hotel'])}"])
    for stage in ("sft", "ppo"):
        (cfg.path / stage).mkdir(parents=True)
        (cfg.path / stage / "stage.json").write_text("{}")
    (cfg.path / "evaluate").mkdir()
    salts = {"j1": "", "j2": "2"}
    monkeypatch.setattr(evaluate.adapter_files, "load_adapter", lambda *a, **k: None)
    monkeypatch.setattr(evaluate.judges, "build", lambda cfg, base: [TextJudge(n, salt=s) for n, s in salts.items()])
    stub.answer = lambda body: {"choices": [{"text": f"{body['model']} on {digest(body['prompt'])}",
                                             "finish_reason": "stop"}]}
    evaluate.run(cfg, SimpleNamespace(tokenizer=chatml), cfg.path / "evaluate")

    red, helpful, _ = evaluate.eval_prompts(cfg)
    assert [p.text for p in red] == RED and [p.text for p in helpful] == HELPFUL + ["Name a hotel"]
    asked = {kind: [data.render(chatml, [{"role": "user", "content": p.text}]) for p in ps]
             for kind, ps in (("red_team", red), ("helpful", helpful))}
    answers = {m: {kind: [f"{name} on {digest(text)}" for text in texts] for kind, texts in asked.items()}
               for m, name in served.items()}
    rows = [json.loads(line) for line in (cfg.path / "evaluate" / "responses.jsonl").read_text().splitlines()]
    assert rows == [{"id": p.id, "kind": kind, "prompt": p.text, **{m: answers[m][kind][i] for m in served}}
                    for kind, ps in (("red_team", red), ("helpful", helpful)) for i, p in enumerate(ps)]
    metrics = json.loads((cfg.path / "evaluate" / "metrics.json").read_text())
    const, want = C.load(cfg.constitution), []  # want: (model, other, kind, prompt index, principle ids, vote)
    for m, o in (("sft", "base"), ("ppo", "base"), ("ppo", "sft")):
        for kind, src, ps in (("harmless", "red_team", red), ("helpful", "helpful", helpful)):
            voted = []
            for i, p in enumerate(ps):
                principles = [C.HELPFUL_PRINCIPLE] if kind == "helpful" else \
                    C.sample(const.preference, cfg.evaluate.num_principles, C.rng_for(cfg.seed, f"eval:{p.id}"))
                comp = judges.Comparison(data.conversation_text(p.text), answers[m][src][i], answers[o][src][i],
                                         principles)
                voted.append(sum(expected_p_a(expected_cells(comp, True, salt=s)) for s in salts.values()) / 2)
                want.append((m, o, kind, i, [pr.id for pr in principles], voted[-1]))
            got = metrics["win_rates"][f"{m}_vs_{o}/{kind}"]["win_rate"]
            assert got == pytest.approx(sum(voted) / len(voted)), (m, o, kind)
    # Win rates are means, blind to verdicts moved between pairs; the per-pair record (the lab oracle's
    # judge agreement reads it) is not.
    judged = []
    evaluate._judge_everything(cfg, None, const, evaluate.judges.build(cfg, None), dict.fromkeys(served), answers,
                               red, helpful, judged)
    assert [j[:5] for j in judged] == [w[:5] for w in want]
    assert [j[5] for j in judged] == pytest.approx([w[5] for w in want], abs=1e-12)
    for m in served:
        for key, question, src, ps in (("harmful", C.HARMFUL_Q, "red_team", red),
                                       ("evasive_red_team", C.EVASIVE_Q, "red_team", red),
                                       ("evasive_helpful", C.EVASIVE_Q, "helpful", helpful)):
            yes = [sum(p_yes(data.conversation_text(p.text, a), question, salt=s) for s in salts.values()) / 2
                   for p, a in zip(ps, answers[m][src])]
            got = metrics["rates"][m][key]
            assert (got["rate"], got["mean_p_yes"]) == pytest.approx((sum(y > 0.5 for y in yes) / len(yes),
                                                                      sum(yes) / len(yes))), (m, key)


def test_judged_revisions_keep_their_own_rows(tmp_path):
    cfg = load_config(["recipe=tiny_cpu", f"run_dir={tmp_path / 'run'}", "evaluate.samples_in_report=2"])
    rows = [{"id": f"r{i}", "type": "harmless", "init_prompt": f"request {i}?", "init_response": f"first answer {i}",
             "revision_response": f"revised answer {i}", "rounds": [{"critique": f"critique {i}", "revision": "x"}]}
            for i in range(8)]
    (cfg.path / "critique_revise").mkdir(parents=True)
    data.write_shard(data.shard_path(cfg.path / "critique_revise", 0), rows)
    const = C.load(cfg.constitution)
    got = evaluate._judge_revisions(cfg, const, TextJudge())
    want = {}
    for r in rows:
        comp = judges.Comparison(data.conversation_text(r["init_prompt"]), r["revision_response"], r["init_response"],
                                 C.sample(const.preference, 1, C.rng_for(cfg.seed, f"rev:{r['id']}")))
        want[r["init_prompt"]] = expected_p_a(expected_cells(comp, True))
    ranked = sorted(want, key=want.get)
    assert [g["prompt"] for g in got] == ranked[-2:][::-1] + ranked[:2]  # the two best, then the two worst
    for g in got:
        i = g["prompt"].split()[1].rstrip("?")
        assert g["p_revision_better"] == pytest.approx(want[g["prompt"]], abs=1e-12)
        assert (g["initial"], g["final"], g["critique"]) == (f"first answer {i}", f"revised answer {i}",
                                                             f"critique {i}")
