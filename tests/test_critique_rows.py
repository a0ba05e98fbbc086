"""critique_revise's rows by value, with generation stubbed: which adapter writes what, which
answer each round critiques, what an empty revision does, and every field of every row (the TRL
formats, counters and flags). No model is loaded.

    python -m pytest -q tests/test_critique_rows.py
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from cai_lite import constitution as C
from cai_lite import data
from cai_lite.generation import Generated
from cai_lite.recipe import load_config
from cai_lite.stages import critique_revise as CR


class Tok:
    """Renders a chat as its messages' contents, one per line, so the stub sees what each prompt holds."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        return "\n".join(m["content"] for m in messages)


def _render(messages) -> str:
    return Tok().apply_chat_template(messages)


# What the stub answers, by prompt: "empty" revises to nothing in round 1; "never" never revises.
REVISIONS = {"p0": ["Revision: R1 of p0", "R2 of p0"], "EMPTY": ["", "R2 of EMPTY"], "NEVER": ["", "  "]}


def test_rows_follow_the_rounds(tmp_path, monkeypatch):
    cfg = load_config(["recipe=tiny_cpu", f"run_dir={tmp_path / 'run'}", "critique_revise.rounds=2",
                       "critique_revise.few_shot=0"])
    const = C.load("harmless")
    calls = []

    def generate(base, prompts, adapter, g, max_new_tokens=None, temperature=None, desc="generate"):
        assert base.tokenizer.__class__ is Tok and g is cfg.generation
        calls.append((desc, adapter, list(prompts)))
        if desc == "answers":
            return Generated([f"A({p})" for p in prompts], [p != "NEVER" for p in prompts],
                             [p == "EMPTY" for p in prompts])
        n = sum(c[0] == desc for c in calls) - 1  # the round
        if desc == "critiques":
            return Generated([f"C{n}" for _ in prompts], [True] * len(prompts), [False] * len(prompts))
        names = [next(k for k in REVISIONS if k in p.split("\n")[0]) for p in prompts]  # the user's request
        return Generated([REVISIONS[k][n] for k in names], [True] * len(prompts), [k == "NEVER" and n == 1 for k in names])

    monkeypatch.setattr(CR.generation, "generate", generate)
    base = SimpleNamespace(tokenizer=Tok())
    shard = [("harmless", data.Prompt("id0", "p0")), ("helpful", data.Prompt("h0", "help me")),
             ("harmless", data.Prompt("id1", "EMPTY")), ("harmless", data.Prompt("id2", "NEVER"))]
    patterns = [re.compile(r"^\s*revision:\s*", re.IGNORECASE)]
    rows = CR._shard_rows(cfg, base, const, shard, "POLICY", "CRITIC", patterns)

    # Answers come from the policy, for every prompt; critiques and revisions from the critic, harmless only.
    assert [(d, a) for d, a, _ in calls] == [("answers", "POLICY"), ("critiques", "CRITIC"), ("revisions", "CRITIC"),
                                             ("critiques", "CRITIC"), ("revisions", "CRITIC")]
    assert calls[0][2] == ["p0", "help me", "EMPTY", "NEVER"]
    principles = {p.id: [rng.choice(const.critique_revision) for rng in [C.rng_for(cfg.seed, p.id)] for _ in range(2)]
                  for _, p in shard if p.id != "h0"}
    # Round 2 critiques the round-1 revision where there was one, else still the first answer.
    assert calls[3][2] == [_render(C.critique_messages(const, "p0", "R1 of p0", principles["id0"][1], 0, False)),
                           _render(C.critique_messages(const, "EMPTY", "A(EMPTY)", principles["id1"][1], 0, False)),
                           _render(C.critique_messages(const, "NEVER", "A(NEVER)", principles["id2"][1], 0, False))]
    assert calls[4][2][0] == _render(C.revision_messages(const, "p0", "R1 of p0", principles["id0"][1], "C1", 0, False))
    r0, h, r1, r2 = rows
    assert [r["id"] for r in rows] == ["id0", "h0", "id1", "id2"]
    assert [r["type"] for r in rows] == ["harmless", "helpful", "harmless", "harmless"]
    assert [r["has_target"] for r in rows] == [True, True, True, False]
    assert r0["rounds"] == [{"principle_id": principles["id0"][0].id, "critique": "C0", "revision": "R1 of p0"},
                            {"principle_id": principles["id0"][1].id, "critique": "C1", "revision": "R2 of p0"}]
    assert r0["cleanup_removals"] == 1 and r0["empty_revisions"] == 0
    assert r0["critic_prompt"] == C.critique_messages(const, "p0", "R1 of p0", principles["id0"][1], 0,
                                                      False)[-1]["content"] and r0["critic_response"] == "C1"
    assert r0["revision_prompt"] == principles["id0"][1].revision and r0["revision_response"] == "R2 of p0"
    user = {"role": "user", "content": "p0"}
    assert r0["prompt"] == [user] and r0["completion"] == [{"role": "assistant", "content": "R2 of p0"}]
    assert r0["messages"] == [user, {"role": "assistant", "content": "R2 of p0"}]
    assert r0["chosen"] == r0["completion"] and r0["rejected"] == [{"role": "assistant", "content": "A(p0)"}]
    assert r0["init_prompt"] == "p0" and r0["init_response"] == "A(p0)" and r0["init_ended_with_eos"] is True
    assert r0["prompt_truncated"] is False
    # An empty round is counted and skipped: the next round revises the first answer again.
    assert r1["empty_revisions"] == 1 and r1["revision_response"] == "R2 of EMPTY" and r1["prompt_truncated"] is True
    assert [x["revision"] for x in r1["rounds"]] == ["", "R2 of EMPTY"]
    # Never a valid revision: no target, empty fields, and the first answer is not passed off as a revision.
    assert r2["empty_revisions"] == 2 and r2["revision_response"] == "" and r2["critic_prompt"] == ""
    assert r2["completion"] == [{"role": "assistant", "content": "A(NEVER)"}] and r2["init_ended_with_eos"] is False
    assert r2["prompt_truncated"] is True  # its last revision prompt was cut
    # Helpful rows: the answer itself is the target, no rounds.
    assert h["rounds"] == [] and h["revision_response"] == "A(help me)" and h["critic_prompt"] == ""
    assert h["completion"] == [{"role": "assistant", "content": "A(help me)"}] and h["empty_revisions"] == 0


@pytest.mark.parametrize("text,want", [("Revision: Revision: ok", ("Revision: ok", 1)), ("ok", ("ok", 0))])
def test_cleanup_removes_each_opener_once(text, want):
    assert CR.clean_revision(text, [re.compile(r"^\s*revision:\s*", re.IGNORECASE)]) == want


def _stub_rows(shard, empty_ids=()):
    return [{"id": p.id, "type": kind, "has_target": p.id not in empty_ids, "init_response": "x" * 4,
             "revision_response": "y" * 10 if p.id not in empty_ids else "", "cleanup_removals": 1,
             "empty_revisions": 2 if p.id in empty_ids else 0, "prompt_truncated": p.text == "red 0"}
            for kind, p in shard]


@pytest.mark.parametrize("policy,critic,want", [("", "", (None, None)), ("P", "", ("policy", "policy")),
                                                 ("", "K", (None, "critique")), ("P", "K", ("policy", "critique"))])
def test_run_wires_adapters_shards_and_counts(tmp_path, monkeypatch, policy, critic, want):
    prompts = tmp_path / "red.jsonl"
    prompts.write_text("".join(f'{{"prompt": "red {i}"}}\n' for i in [0, 1, 2, 3, 1]))  # one duplicate
    helpful = tmp_path / "help.jsonl"
    helpful.write_text('{"prompt": "' + "h" * 50 + '"}\n')
    cfg = load_config(["recipe=tiny_cpu", f"run_dir={tmp_path / 'run'}", f"data.prompts={prompts}", "data.limit=0",
                       "data.eval_prompts=0", "data.max_prompt_chars=20", "critique_revise.shard_size=2",
                       f"critique_revise.helpful_prompts={helpful}", "critique_revise.helpful_limit=0",
                       f"critique_revise.policy_adapter={policy}", f"critique_revise.critic_adapter={critic}",
                       "constitution=harmless"])
    base = SimpleNamespace(tokenizer=Tok())
    loaded, seen = [], []
    monkeypatch.setattr(CR.adapter_files, "load_adapter", lambda b, name, path, replace=False: loaded.append(
        (b is base, name, path, replace)))

    def shard_rows(c, b, const, shard, pol, crit, patterns):
        seen.append((pol, crit, [(k, p.text) for k, p in shard]))
        return _stub_rows(shard, empty_ids={p.id for k, p in shard if p.text == "red 3"})

    monkeypatch.setattr(CR, "_shard_rows", shard_rows)
    out = cfg.path / "critique_revise"
    out.mkdir(parents=True)
    got = CR.run(cfg, base, out)
    assert loaded == [(True, "policy", "P", True)] * bool(policy) + [(True, "critique", "K", True)] * bool(critic)
    assert {(pol, crit) for pol, crit, _ in seen} == {want}
    texts = [t for _, _, shard in seen for t in shard]
    assert sorted(texts) == sorted([("harmless", f"red {i}") for i in range(4)] + [("helpful", "h" * 20)])
    assert len(seen) == 3  # 5 items in shards of 2
    failed = data.read_failed(out)
    assert [r["has_target"] for r in failed] == [False] and all(r["has_target"] for r in data.read_shards(out))
    assert got == {"rows": 4, "harmless_rows": 3, "helpful_rows": 1, "rounds": cfg.critique_revise.rounds,
                   "constitution": "harmless", "truncated_prompt_chars": 0, "duplicate_prompts_dropped": 1,
                   "mean_init_chars": 4.0, "mean_final_chars": 10.0, "cleanup_removals": 4, "empty_revisions": 2,
                   "rows_without_revision": 1, "truncated_prompt_tokens": 1, "resumed_shards": 0,
                   "generation": {"backend": "local"}}
    # A rerun finds every shard written and resumes them all, counting from the rows on disk.
    seen.clear()
    again = CR.run(cfg, base, out)
    assert seen == [] and again["resumed_shards"] == 3 and again["rows"] == 4 and again["empty_revisions"] == 2
