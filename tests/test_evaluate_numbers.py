"""evaluate's numbers under a strict stub judge: every prompt must be exactly what the stage is
meant to send (prefill, letters, option wording, the prompt and answer in the transcript, the
helpful principle on helpful prompts), and every number is checked by value: sampled principles,
bootstrap intervals, failures, empty prompt sets, the reward model's mean score; and the lab
oracle's rates and judge agreement on hand-made answers. No model is loaded.

    python -m pytest -q tests/test_evaluate_numbers.py
"""

from __future__ import annotations

import json

import pytest
import torch

from cai_lite import constitution as C
from cai_lite import data, ratings
from cai_lite.lab import oracle as O
from cai_lite.lab import world as W
from cai_lite.recipe import load_config
from cai_lite.stages import evaluate


def _cfg(tmp_path, *overrides: str):
    return load_config(["recipe=tiny_cpu", f"run_dir={tmp_path / 'run'}", *overrides])


class Strict:
    """Raises on any prompt the stage should not send. Comparisons: P(slot A) 0.9 - 0.1 * index of
    the prompt when A says SAFE and B does not (mirrored for B), 0.5 otherwise; on helpful prompts
    the same with HELP. Classification: P(yes) 0.9 for HARM answers to the harmful question, 0.7
    for MEH answers to the evasive one, else 0.1. Answers containing FAIL fail in the first order
    (and comparisons holding them fail), answers containing LIAF in the second."""

    name, hard_labels = "strict", 0

    def __init__(self, prompts: list[str]):
        self.prompts = prompts  # every prompt text, in order, to find each one's index

    def _index(self, text: str) -> int:
        hits = [i for i, p in enumerate(self.prompts) if f"Human: {p}\n\n" in text]
        assert len(hits) == 1, f"the transcript must hold its own prompt: {text[:200]!r}"
        return hits[0]

    def option_probs(self, prompts, letters):
        assert letters == "AB"
        out = []
        for p in prompts:
            assert p.prefill == C.COMPARISON_PREFILL
            text = p.messages[-1]["content"]
            i = self._index(text)
            if text.startswith("Here is a conversation"):  # a classification question
                opts = text.split("\nOptions:\n", 1)[1].split("\n\n", 1)[0]
                assert opts in ("(A) Yes\n(B) No", "(A) No\n(B) Yes"), opts
                answer = text.split("\n\nAssistant: ", 1)[1]
                if "FAIL" in answer and opts.startswith("(A) Yes") or "LIAF" in answer and opts.startswith("(A) No"):
                    out.append(None)
                    continue
                yes = 0.9 if "HARM" in answer and "harmful" in text else \
                    0.7 if "MEH" in answer and "dodge" in text else 0.1
                pa = yes if opts.startswith("(A) Yes") else 1 - yes
            else:
                a = text.split("\n(A) ", 1)[1].split("\n(B) ", 1)[0]
                b = text.split("\n(B) ", 1)[1]
                word = "HELP" if C.HELPFUL_PRINCIPLE.text in text else "SAFE"
                if word == "HELP":
                    assert self.prompts[i].startswith("help"), "the helpful principle is for helpful prompts only"
                if "FAIL" in a + b:
                    out.append(None)
                    continue
                strong = 0.9 - 0.1 * (i % 4)
                pa = strong if word in a and word not in b else 1 - strong if word in b and word not in a else 0.5
            out.append([pa, 1 - pa])
        return out

    def close(self):
        pass


RED = [data.Prompt(f"r{i}", f"red {i}?") for i in range(4)]
HELPFUL = [data.Prompt(f"h{i}", f"help {i}?") for i in range(2)]
JUDGE = Strict([p.text for p in RED + HELPFUL])


def test_every_number_follows_the_strict_judge(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "evaluate.bootstrap=300", "evaluate.num_principles=2", "seed=3")
    responses = {"base": {"red_team": ["HARM here"] * 4, "helpful": ["MEH"] * 2},
                 "sft": {"red_team": ["MEH no"] * 4, "helpful": ["HELP is here"] * 2},
                 "ppo": {"red_team": ["SAFE answer"] * 4, "helpful": ["HELP too"] * 2}}
    present = {"base": None, "sft": "sft", "ppo": "ppo"}
    (cfg.path / "reward_model").mkdir(parents=True)
    (cfg.path / "reward_model" / "stage.json").write_text("{}")
    loaded, scored = [], []
    monkeypatch.setattr(evaluate.adapter_files, "load_adapter", lambda base, name, path: loaded.append((base, name, path)))

    def score(base, prompts, texts, batch_size, max_tokens):
        scored.append((base, prompts, texts, batch_size, max_tokens))
        return torch.tensor([float(len(t)) for t in texts])

    monkeypatch.setattr(evaluate.rollout, "score", score)
    judged = []
    const = C.load("harmless")
    m = evaluate._judge_everything(cfg, "BASE", const, [JUDGE], present, responses, RED, HELPFUL, judged)
    w = m["win_rates"]
    # Both orders agree, so P(ppo better) on red prompt i is 0.9 - 0.1 i.
    want = [0.9 - 0.1 * i for i in range(4)]
    assert w["ppo_vs_base/harmless"]["win_rate"] == pytest.approx(sum(want) / 4)
    ci = ratings.win_rate(want, 300, cfg.seed)
    assert (w["ppo_vs_base/harmless"]["ci_low"], w["ppo_vs_base/harmless"]["ci_high"]) == pytest.approx(
        (ci["ci_low"], ci["ci_high"]))
    # Helpful prompts are judged on the helpful answers under the helpful principle: sft and ppo both help.
    assert w["ppo_vs_sft/helpful"]["win_rate"] == pytest.approx(0.5)
    assert w["sft_vs_base/helpful"]["win_rate"] == pytest.approx((0.9 + 0.8) / 2)  # help prompts are 4 and 5
    assert w["ppo_vs_sft/harmless"]["win_rate"] == pytest.approx(sum(want) / 4)
    # The principles each comparison used: the seeded sample per prompt, or the helpful one.
    for model, other, kind, i, ids, p in judged:
        if kind == "harmless":
            assert ids == [x.id for x in C.sample(const.preference, 2, C.rng_for(cfg.seed, f"eval:{RED[i].id}"))]
        else:
            assert ids == ["helpful"]
    assert len(judged) == 3 * (4 + 2)
    assert [j[5] for j in judged if j[:3] == ("ppo", "base", "harmless")] == pytest.approx(want)
    # The reward model scores every model's answers, red team then helpful, with the prompts they answer.
    assert loaded == [("BASE", "reward", cfg.path / "reward_model" / "adapter")]
    assert [s[2] for s in scored] == [responses[x]["red_team"] + responses[x]["helpful"] for x in present]
    assert all(s[0] == "BASE" and s[1] == [p.text for p in RED + HELPFUL] for s in scored)
    assert all(s[3] == cfg.generation.batch_size and
               s[4] == cfg.generation.max_prompt_tokens + cfg.evaluate.max_new_tokens for s in scored)
    assert m["mean_reward"] == pytest.approx({x: sum(map(len, r["red_team"] + r["helpful"])) / 6
                                              for x, r in responses.items()})


def test_failures_and_empty_prompt_sets_are_counted_not_guessed(tmp_path):
    cfg = _cfg(tmp_path, "judge.max_failure_rate=1")
    responses = {"base": {"red_team": ["FAIL"] * 4, "helpful": ["MEH"] * 2},
                 "sft": {"red_team": ["SAFE LIAF"] * 4, "helpful": ["HELP"] * 2}}
    m = evaluate._judge_everything(cfg, None, C.load("harmless"), [JUDGE], {"base": None, "sft": "sft"}, responses,
                                   RED, HELPFUL)
    assert m["win_rates"]["sft_vs_base/harmless"] == {"win_rate": None, "failures": 4}
    assert m["win_rates"]["sft_vs_base/helpful"]["win_rate"] == pytest.approx(0.85)
    # A classification that failed in one order keeps the other order's answer.
    for model in ("base", "sft"):  # FAIL in the first order, LIAF in the second
        harm = m["rates"][model]["harmful"]
        assert harm["failures"] == 0 and harm["rate"] == 0.0 and harm["mean_p_yes"] == pytest.approx(0.1)
    # No red-team prompts: the helpful numbers are still all there.
    m = evaluate._judge_everything(cfg, None, C.load("harmless"), [JUDGE], {"base": None, "sft": "sft"}, responses,
                                   [], HELPFUL)
    assert set(m["win_rates"]) == {"sft_vs_base/helpful"}
    assert set(m["rates"]["base"]) == {"evasive_helpful"} and m["rates"]["base"]["evasive_helpful"]["rate"] == 1.0
    # Every comparison failed: no ratings at all rather than a fit to nothing.
    only_fail = {"base": {"red_team": ["FAIL"] * 4, "helpful": []}, "sft": {"red_team": ["FAIL"] * 4, "helpful": []}}
    m = evaluate._judge_everything(cfg, None, C.load("harmless"), [JUDGE], {"base": None, "sft": "sft"}, only_fail,
                                   RED, [])
    assert m["elo"] is None


def test_too_many_failures_name_what_failed(tmp_path):
    cfg = _cfg(tmp_path, "judge.max_failure_rate=0.1")
    responses = {"base": {"red_team": ["FAIL"] * 4, "helpful": []}, "sft": {"red_team": ["FAIL"] * 4, "helpful": []}}
    from cai_lite.judges import JudgeError

    with pytest.raises(JudgeError, match="of 8 evaluation answers failed"):
        evaluate._rates(cfg, [JUDGE], {}, RED, [], responses["base"])


# ---- the lab oracle in evaluate -------------------------------------------------------------

def test_oracle_rates_by_split_and_judge_agreement():
    world = W.make_world(0)
    form = world.requests("held_out_form", harmful=True)[0]
    combo = world.requests("held_out_combo", harmful=True)[0]
    benign = next(r for r in world.requests("held_out_form", harmful=False) if not world.act(r.act).covert)
    pair = W.twin(world, combo)
    rng = __import__("random").Random(0)
    harm = [W.respond(world, r, "harmful", rng) for r in (form, combo)]
    engage = [W.respond(world, r, "engaging-harmless", rng) for r in (form, combo)]
    refuse = "I can't help with that."
    helpful = W.respond(world, benign, "helpful", rng)
    responses = {"base": {"red_team": harm, "helpful": [helpful, W.respond(world, pair, "helpful", rng)]},
                 "sft": {"red_team": [refuse, engage[1]], "helpful": [refuse, engage[1]]}}
    judged = [("sft", "base", "harmless", 0, ["harmless"], 0.8),  # evasive > harmful: right
              ("sft", "base", "harmless", 1, ["harmless", "engaging-not-evasive"], 0.3),  # engaging > harmful: wrong
              ("sft", "base", "helpful", 0, ["helpful"], 0.2),  # over-refusal < helpful: right
              ("sft", "base", "harmless", 0, ["harmless"], None)]  # a failure: left out
    got = O.evaluation(world, [form.text, combo.text], [benign.text, pair.text], responses, judged)
    base, sft = got["rates"]["base"], got["rates"]["sft"]
    assert base["red_team"]["all"]["harmful"] == 1.0 and base["red_team"]["all"]["n"] == 2
    assert sft["red_team"]["held_out_form"]["evasive"] == 1.0 and sft["red_team"]["held_out_form"]["n"] == 1
    assert sft["red_team"]["held_out_combo"]["engaging-harmless"] == 1.0
    assert sft["helpful"]["all"]["over-refusal"] == 1.0 and base["helpful"]["all"]["helpful"] == 1.0
    # The harmful twin's concern given to its benign minimal pair is over-refusal, and counted there.
    assert sft["helpful"]["minimal_pairs"] == {**sft["helpful"]["minimal_pairs"], "over-refusal": 1.0, "n": 1}
    assert got["harmful_borrowed"]["base"] == {"share": 0.0, "n": 2} and got["harmful_borrowed"]["sft"]["n"] == 0
    assert got["families"]["sft"] == {"red_team": ["evasive", "engaging-harmless"], "helpful": ["over-refusal"] * 2}
    assert got["judge_agreement"] == {"agreement": pytest.approx(2 / 3, abs=1e-4), "n": 3, "skipped_ties_or_failures": 1,
                                      "by_type": {"harmless": {"agreement": 0.5, "n": 2},
                                                  "helpful": {"agreement": 1.0, "n": 1},
                                                  "held_out_combo": {"agreement": 0.0, "n": 1}}}
    # A tie under the principle (evasive vs engaging under a harm-only principle) is no evidence.
    tie = O.evaluation(world, [form.text], [], {"a": {"red_team": [refuse], "helpful": []},
                                                "b": {"red_team": [engage[0]], "helpful": []}},
                       [("a", "b", "harmless", 0, ["harmless"], 0.9)])
    assert tie["judge_agreement"]["n"] == 0 and tie["judge_agreement"]["agreement"] is None
    assert json.loads(json.dumps(got)) == got  # metrics.json can hold it


def test_a_models_answers_do_not_depend_on_which_others_are_evaluated(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from cai_lite.generation import Generated

    def generate(base, texts, adapter, g, max_new_tokens=None, temperature=None, desc=""):
        # Sampling stands in as a draw from torch's RNG, as generate's sampling is.
        return Generated([f"{adapter}:{torch.rand(1).item():.8f}" for _ in texts], [True] * len(texts),
                         [False] * len(texts))

    monkeypatch.setattr(evaluate.generation, "generate", generate)
    tok = SimpleNamespace(apply_chat_template=lambda m, tokenize=False, add_generation_prompt=False: m[0]["content"])
    base = SimpleNamespace(tokenizer=tok)
    red, helpful = [data.Prompt("r0", "burgle"), data.Prompt("r1", "poison")], [data.Prompt("h0", "bake")]
    cfg = _cfg(tmp_path)
    both = evaluate._responses(cfg, base, {"base": None, "sft": "sft"}, red, helpful)
    alone = evaluate._responses(cfg, base, {"sft": "sft"}, red, helpful)
    assert alone["sft"] == both["sft"]
    assert len({*both["sft"]["red_team"], *both["sft"]["helpful"], *both["base"]["red_team"]}) == 5  # draws differ
    other_seed = evaluate._responses(_cfg(tmp_path, "seed=1"), base, {"sft": "sft"}, red, helpful)
    assert other_seed["sft"]["red_team"] != alone["sft"]["red_team"]
