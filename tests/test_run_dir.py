"""Run-directory logic on `stage.json`, `.resume_key` and shard files alone, no model: which stages
a rerun skips, redoes or refuses, when partial outputs of a crashed stage are reused or thrown
away, and how critique_revise resumes shard by shard and samples its principles per (seed, prompt).

    python -m pytest tests/test_run_dir.py -q
"""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest

from cai_lite import constitution as C
from cai_lite import data, generation, pipeline, rundir, stage_plan
from cai_lite.recipe import load_config
from cai_lite.stages import critique_revise
from cai_lite.typed_yaml import ConfigError


def _cfg(run_dir, *overrides: str):
    return load_config(["recipe=tiny_cpu", f"run_dir={run_dir}", *overrides])


def _done(cfg, plan: stage_plan.Plan, name: str, output_id: str, **inputs_done: str) -> None:
    """Write the stage.json a finished stage leaves, as pipeline.run writes it."""
    (cfg.path / name).mkdir(parents=True, exist_ok=True)
    record = {"stage": name, "config_hash": plan.hashes[name], "output_id": output_id, "inputs_done": inputs_done,
              **plan.snapshots[name]}
    (cfg.path / name / "stage.json").write_text(json.dumps(record))


SL = "stages=[critique_revise,sft]"


def test_plan_skips_what_is_done_and_redoes_what_read_a_redone_stage(tmp_path):
    cfg = _cfg(tmp_path, SL)
    first = stage_plan.plan(cfg)
    assert first.actions == {"critique_revise": "run", "sft": "run"}
    assert first.inputs["sft"] == ["critique_revise"] and first.inputs["critique_revise"] == []
    assert first.snapshots["sft"]["inputs"] == {"critique_revise": first.hashes["critique_revise"]}
    _done(cfg, first, "critique_revise", "cr-1")
    _done(cfg, first, "sft", "sft-1", critique_revise="cr-1")
    again = stage_plan.plan(cfg)
    assert again.actions == {"critique_revise": "skip", "sft": "skip"} and again.hashes == first.hashes
    # critique_revise forced: its output will be remade, so sft, unchanged itself, must follow.
    forced = stage_plan.plan(_cfg(tmp_path, SL, "force=[critique_revise]"))
    assert forced.actions == {"critique_revise": "run", "sft": "run"}
    # critique_revise was redone alone since sft ran (a new output_id on disk): sft reruns.
    _done(cfg, first, "critique_revise", "cr-2")
    assert stage_plan.plan(_cfg(tmp_path, "stages=[sft]")).actions == {"sft": "run"}
    assert stage_plan.plan(cfg).actions == {"critique_revise": "skip", "sft": "run"}
    _done(cfg, first, "sft", "sft-2", critique_revise="cr-2")
    assert stage_plan.plan(_cfg(tmp_path, "stages=[sft]")).actions == {"sft": "skip"}


def test_plan_refuses_changed_own_keys_and_stale_unselected_inputs(tmp_path):
    cfg = _cfg(tmp_path, SL)
    p = stage_plan.plan(cfg)
    _done(cfg, p, "critique_revise", "cr-1")
    _done(cfg, p, "sft", "sft-1", critique_revise="cr-1")
    with pytest.raises(ConfigError) as e:
        stage_plan.plan(_cfg(tmp_path, SL, "critique_revise.rounds=3"))
    assert e.value.errors == [f"critique_revise: already done with other settings: critique_revise.rounds: 2 -> 3. "
                              "Use force=[critique_revise] to redo it, or run_name= for a new run"]
    # A change upstream only: forcing the upstream stage reruns both (sft's hash moves with its input's).
    both = stage_plan.plan(_cfg(tmp_path, SL, "critique_revise.rounds=3", "force=[critique_revise]"))
    assert both.actions == {"critique_revise": "run", "sft": "run"} and both.hashes["sft"] != p.hashes["sft"]
    assert both.hashes["critique_revise"] != p.hashes["critique_revise"]
    # Reading an unselected stage made with other settings, or from an input remade since, is refused.
    with pytest.raises(ConfigError) as e:
        stage_plan.plan(_cfg(tmp_path, "stages=[sft]", "critique_revise.rounds=3"))
    assert e.value.errors == [f"critique_revise: its output in {cfg.path} is out of date: it was made with other "
                              "settings (critique_revise.rounds: 2 -> 3), and sft would read it; add critique_revise "
                              "to stages to redo it"]
    _done(cfg, p, "critique_revise", "cr-2")
    with pytest.raises(ConfigError) as e:
        stage_plan.plan(_cfg(tmp_path, "stages=[label_preferences]"))
    assert e.value.errors == [f"sft: its output in {cfg.path} is out of date: its input critique_revise was remade "
                              "after it ran, and label_preferences would read it; add sft to stages to redo it"]
    # Nobody reads it: a stale stage that is not selected is no error.
    assert stage_plan.plan(_cfg(tmp_path, "stages=[critique_revise]")).actions == {"critique_revise": "skip"}


def test_plan_optional_inputs_and_missing_inputs(tmp_path):
    cfg = _cfg(tmp_path, "stages=[evaluate]")
    with pytest.raises(ConfigError) as e:
        stage_plan.plan(cfg)
    assert e.value.errors == [f"stages: evaluate reads the output of {up}, which is neither selected nor done in "
                              f"{cfg.path} (add {up} to stages)" for up in ("critique_revise", "sft")]
    p = stage_plan.plan(_cfg(tmp_path, "stages=[critique_revise,sft,label_preferences,reward_model,dpo]"))
    for name, up in (("critique_revise", {}), ("sft", {"critique_revise": "c"}), ("label_preferences", {"sft": "s"}),
                     ("reward_model", {"label_preferences": "l"}), ("dpo", {"sft": "s", "label_preferences": "l"})):
        _done(cfg, p, name, name[0], **up)
    ev = stage_plan.plan(cfg)
    assert ev.actions == {"evaluate": "run"}
    done = ["critique_revise", "sft", "label_preferences", "reward_model", "dpo"]  # what is done, of what it may read
    assert ev.inputs["evaluate"] == done and set(ev.snapshots["evaluate"]["inputs"]) == set(done)


def test_own_changes_and_stale_by_value():
    done = {"config": {"sft": {"lr": 0.1, "steps": 2}, "seed": 0}, "inputs_done": {"a": "x", "b": "y"}}
    snap = {"config": {"sft": {"lr": 0.2, "steps": 2}, "seed": 0, "lora": {"r": 8}}}
    assert stage_plan._own_changes(done, snap) == ["lora.r: None -> 8", "sft.lr: 0.1 -> 0.2"]
    assert stage_plan._own_changes(done, {"config": done["config"]}) == []
    assert stage_plan._stale(done, ["a", "b", "c"], {"a": "x", "b": "z", "c": "w"}) == ["b", "c"]
    assert stage_plan._stale(done, ["a", "b"], {"a": None, "b": "y"}) == ["a"]  # a is remade in this run
    assert stage_plan._stale(None, ["a"], {"a": "x"}) == ["a"] and stage_plan._stale(done, [], {}) == []


# ---- pipeline.run with stand-in stages: what a stage finds in its folder when it starts -------

def test_run_resumes_partial_outputs_only_under_the_same_config(tmp_path, fake_stages):
    seen, base = fake_stages
    cfg = _cfg(tmp_path / "run", "stages=[critique_revise]", *base)
    out = cfg.path / "critique_revise"
    # A crash left one shard, made with this very config: the rerun keeps it and resumes.
    out.mkdir(parents=True)
    data.write_shard(data.shard_path(out, 0), [{"old": 1}])
    key = {"config_hash": stage_plan.plan(cfg).hashes["critique_revise"], "inputs_done": {}}
    (out / ".resume_key").write_text(json.dumps(key, sort_keys=True))
    result = pipeline.run(cfg)
    assert seen["critique_revise"] == [".resume_key", "part-00000.jsonl"]
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000.jsonl", "part-00001.jsonl"]
    record = json.loads((out / "stage.json").read_text())
    assert record == result["critique_revise"] and record["made"] == "critique_revise"
    assert json.loads((out / ".resume_key").read_text()) == {"config_hash": record["config_hash"], "inputs_done": {}}
    # Same config, done: skipped, nothing touched.
    assert pipeline.run(cfg)["critique_revise"] == record and "stage.json" in {p.name for p in out.iterdir()}
    # A crash under other settings: its partial shards are thrown away before the stage starts.
    (out / "stage.json").unlink()
    other = _cfg(tmp_path / "run", "stages=[critique_revise]", "critique_revise.rounds=3", *base)
    pipeline.run(other)
    assert seen["critique_revise"] == [".resume_key"]
    assert [p.name for p in out.glob("part-*")] == ["part-00000.jsonl"]
    # force= starts from an empty folder even under the same config.
    forced = _cfg(tmp_path / "run", "stages=[critique_revise]", "critique_revise.rounds=3", "force=[critique_revise]",
                  *base)
    again = pipeline.run(forced)
    assert seen["critique_revise"] == [".resume_key"] and again["critique_revise"]["output_id"] != record["output_id"]


def test_run_records_what_each_stage_read(tmp_path, fake_stages):
    seen, base = fake_stages
    cfg = _cfg(tmp_path / "run", SL, *base)
    out = pipeline.run(cfg)
    assert out["sft"]["inputs_done"] == {"critique_revise": out["critique_revise"]["output_id"]}
    assert out["sft"]["inputs"] == {"critique_revise": out["critique_revise"]["config_hash"]}
    assert out["sft"]["stage"] == "sft" and out["critique_revise"]["output_id"] != out["sft"]["output_id"]
    assert json.loads((cfg.path / "sft" / "stage.json").read_text()) == out["sft"]
    # Redo critique_revise alone, then ask for sft: it reruns because what it read was remade.
    pipeline.run(_cfg(tmp_path / "run", "stages=[critique_revise]", "force=[critique_revise]", *base))
    seen.clear()
    redo = pipeline.run(_cfg(tmp_path / "run", "stages=[sft]", *base))
    assert "sft" in seen and redo["sft"]["inputs_done"]["critique_revise"] != out["critique_revise"]["output_id"]


# ---- critique_revise: principles, the revision chain and shard-by-shard resume ----------------

class _Tok:
    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" if add_generation_prompt else "")


@pytest.fixture
def fake_generate(monkeypatch):
    """generation.generate answering `<desc><call>-<row>`, with a cleanup-worthy opener on revisions."""
    calls: list[tuple[str, list[str], str | None]] = []

    def generate(base, prompts, adapter, g, desc="generate", **_):
        calls.append((desc, prompts, adapter))
        k = sum(c[0] == desc for c in calls)
        opener = "Sure, here is a revised response: " if desc == "revisions" else ""
        return generation.Generated([f"{opener}{desc}{k}-{i}" for i in range(len(prompts))], [i % 2 == 0 for i in
                                                                                              range(len(prompts))],
                                    [False] * len(prompts))

    monkeypatch.setattr(generation, "generate", generate)
    return calls


def test_critique_revise_samples_principles_per_prompt_and_revises_the_latest(tmp_path, fake_generate):
    cfg = _cfg(tmp_path / "run", "critique_revise.rounds=3", "data.limit=4", "data.eval_prompts=2",
               "critique_revise.helpful_limit=1", "critique_revise.shard_size=8")
    out = cfg.path / "critique_revise"
    out.mkdir(parents=True)
    metrics = critique_revise.run(cfg, SimpleNamespace(tokenizer=_Tok()), out)
    const = C.load(cfg.constitution)
    rows = data.read_shards(out)
    train = data.prompt_split(cfg).train
    helpful = data.read_optional(cfg.critique_revise.helpful_prompts, 1, cfg.data.max_prompt_chars)
    assert [r["id"] for r in rows] == [p.id for p in train] + [helpful[0].id]
    harmless = [r for r in rows if r["type"] == "harmless"]
    assert len(harmless) == 4 and metrics["harmless_rows"] == 4 and metrics["helpful_rows"] == 1
    for i, r in enumerate(harmless):
        rng = C.rng_for(cfg.seed, r["id"])
        want = [rng.choice(const.critique_revision).id for _ in range(3)]
        assert [x["principle_id"] for x in r["rounds"]] == want  # the same principles whatever shard or resume
        assert [x["revision"] for x in r["rounds"]] == [f"revisions{k}-{i}" for k in (1, 2, 3)]  # opener stripped
        assert [x["critique"] for x in r["rounds"]] == [f"critiques{k}-{i}" for k in (1, 2, 3)]
        assert r["init_response"] == f"answers1-{i}" and r["revision_response"] == "revisions3-" + str(i)
    descs = [c[0] for c in fake_generate]
    assert descs == ["answers"] + ["critiques", "revisions"] * 3
    crit_prompts = [c[1] for c in fake_generate if c[0] == "critiques"]
    rev_prompts = [c[1] for c in fake_generate if c[0] == "revisions"]
    for k in range(3):
        for i, r in enumerate(harmless):
            latest = f"answers1-{i}" if k == 0 else f"revisions{k}-{i}"
            principle = next(p for p in const.critique_revision if p.id == r["rounds"][k]["principle_id"])
            assert f"<assistant>{latest}<user>{principle.critique}" in crit_prompts[k][i]
            assert rev_prompts[k][i].endswith(f"<assistant>critiques{k + 1}-{i}<user>{principle.revision}<assistant>")
    assert len(crit_prompts[0]) == 4  # the helpful prompt is answered, never critiqued
    assert metrics["cleanup_removals"] == 12 and metrics["rounds"] == 3 and metrics["resumed_shards"] == 0
    assert metrics["rows"] == 5


def test_critique_revise_resumes_shard_by_shard(tmp_path, fake_generate):
    cfg = _cfg(tmp_path / "run", "critique_revise.rounds=1", "data.limit=4", "data.eval_prompts=2",
               "critique_revise.helpful_prompts=", "critique_revise.shard_size=2")
    out = cfg.path / "critique_revise"
    out.mkdir(parents=True)
    train = data.prompt_split(cfg).train
    kept = [{"id": train[0].id, "type": "harmless", "init_response": "old", "revision_response": "kept",
             "cleanup_removals": 5, "empty_revisions": 0, "prompt_truncated": True}]
    data.write_shard(data.shard_path(out, 0), kept)  # shard 0 survived a crash: it is not redone
    metrics = critique_revise.run(cfg, SimpleNamespace(tokenizer=_Tok()), out)
    assert metrics["resumed_shards"] == 1 and metrics["rows"] == 3
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000.jsonl", "part-00001.jsonl"]
    answered = [c[1] for c in fake_generate if c[0] == "answers"]
    assert len(answered) == 1 and len(answered[0]) == 2  # only the second shard was generated
    assert train[2].text in answered[0][0] and train[3].text in answered[0][1]
    assert metrics["cleanup_removals"] == 5 + 2 and metrics["truncated_prompt_tokens"] == 1


def test_hashes_ignore_judge_speed_keys_only(tmp_path):
    def hashes(*overrides):
        stages = "stages=[critique_revise,sft,label_preferences,reward_model]"
        return stage_plan.plan(_cfg(tmp_path, stages, *overrides)).hashes

    plain = hashes()
    assert hashes("judge.concurrency=1", "judge.timeout_s=5", "judge.retries=0", "judge.batch_size=2",
                  "judge.n_threads=1") == plain
    for changed in ("judge.adapter=sft", "judge_vote=majority", "label_preferences.num_principles=3"):
        moved = hashes(changed)
        assert moved["label_preferences"] != plain["label_preferences"] and moved["evaluate"] != plain["evaluate"]
        assert moved["critique_revise"] == plain["critique_revise"] and moved["sft"] == plain["sft"]
        assert moved["reward_model"] != plain["reward_model"]  # it reads the relabelled preferences
    snap = stage_plan.plan(_cfg(tmp_path, "stages=[critique_revise]")).snapshots["label_preferences"]["config"]
    assert "concurrency" not in snap["judge"] and snap["judge"]["adapter"] == "none" and snap["judges"] == []
    assert snap["seed"] == 0 and snap["label_preferences"]["num_principles"] == _cfg(
        tmp_path).label_preferences.num_principles
    # An upstream stage's config moves the hash of every stage that reads it, through its inputs.
    lr = hashes("sft.lr=0.5")
    assert lr["sft"] != plain["sft"] and lr["label_preferences"] != plain["label_preferences"]
    assert lr["reward_model"] != plain["reward_model"] and lr["critique_revise"] == plain["critique_revise"]


def test_run_writes_the_config_and_builds_a_missing_tiny_model(tmp_path, fake_stages, monkeypatch):
    import yaml

    from cai_lite import tiny

    seen, _ = fake_stages
    built = []
    monkeypatch.setattr(tiny, "build_tiny_model", lambda folder, arch: built.append((folder, arch)))
    model = tmp_path / "runs" / "_models" / "tiny-llama-test"
    cfg = _cfg(tmp_path / "deep" / "er" / "run", "stages=[critique_revise]", f"base.model={model}",
               "base.create=tiny-llama")
    out = pipeline.run(cfg)
    assert built == [(str(model), "llama")] and seen["cfg"] is cfg
    written = yaml.safe_load((cfg.path / "config.yaml").read_text())
    assert written == json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    assert list(written) == list(dataclasses.asdict(cfg))  # in the schema's order, as people read it
    record = out["critique_revise"]
    assert record["versions"] == rundir.versions() and record["peak_memory_scope"] == "stage"
    assert record["seconds"] >= 0 and record["peak_memory_mb"] > 0 and record["memory"] == {}
    # The folder exists now: nothing is built again.
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    pipeline.run(_cfg(tmp_path / "deep" / "er" / "run", "stages=[critique_revise]", f"base.model={model}",
                      "base.create=tiny-llama", "force=[critique_revise]"))
    assert len(built) == 1


def test_judge_panels_hash_without_their_speed_keys_too(tmp_path):
    def plan(concurrency: int, adapter: str = "sft"):
        return stage_plan.plan(_cfg(tmp_path, "stages=[critique_revise]", "judges=[{backend: local, adapter: none, "
                                  f"concurrency: {concurrency}}}, {{backend: local, adapter: {adapter}}}]"))

    slow, fast = plan(1), plan(8)
    assert slow.hashes["label_preferences"] == fast.hashes["label_preferences"]
    assert [j["adapter"] for j in slow.snapshots["label_preferences"]["config"]["judges"]] == ["none", "sft"]
    assert all("concurrency" not in j for j in slow.snapshots["label_preferences"]["config"]["judges"])
    assert plan(1, "critique").hashes["label_preferences"] != slow.hashes["label_preferences"]


def test_own_changes_of_a_record_without_config():
    snap = {"config": {"seed": 0, "sft": {"lr": 0.1}}}
    assert stage_plan._own_changes({"stage": "sft"}, snap) == ["seed: None -> 0", "sft.lr: None -> 0.1"]


def test_hash_is_of_the_sorted_snapshot(tmp_path):
    """Hashes must not depend on dict order, or a stage.json written by another version would not match."""
    import hashlib

    p = stage_plan.plan(_cfg(tmp_path, SL))
    for name, snap in p.snapshots.items():
        want = hashlib.sha256(json.dumps(snap, sort_keys=True, default=str).encode()).hexdigest()[:16]
        assert p.hashes[name] == want


def test_refusals_list_every_change_stale_input_and_reader(tmp_path):
    every = "stages=[critique_revise,sft,label_preferences,dpo]"
    cfg = _cfg(tmp_path, every)
    p = stage_plan.plan(cfg)
    _done(cfg, p, "critique_revise", "c1")
    _done(cfg, p, "sft", "s1", critique_revise="c0")  # made from an older critique_revise
    _done(cfg, p, "label_preferences", "l1", sft="s1")
    _done(cfg, p, "dpo", "d1", sft="s0", label_preferences="l0")  # both its inputs remade since
    with pytest.raises(ConfigError) as e:
        stage_plan.plan(_cfg(tmp_path, "stages=[label_preferences,dpo]"))
    assert e.value.errors == [f"sft: its output in {cfg.path} is out of date: its input critique_revise was remade "
                              "after it ran, and label_preferences, dpo would read it; add sft to stages to redo it"]
    with pytest.raises(ConfigError) as e:
        stage_plan.plan(_cfg(tmp_path, "stages=[sft,evaluate]"))
    assert f"dpo: its output in {cfg.path} is out of date: its input sft, label_preferences was remade after it " \
           "ran, and evaluate would read it; add dpo to stages to redo it" in e.value.errors
    with pytest.raises(ConfigError) as e:
        stage_plan.plan(_cfg(tmp_path, every, "critique_revise.rounds=3", "critique_revise.few_shot=2"))
    assert e.value.errors[0] == ("critique_revise: already done with other settings: critique_revise.few_shot: 1 -> 2; "
                                 "critique_revise.rounds: 2 -> 3. Use force=[critique_revise] to redo it, or "
                                 "run_name= for a new run")
    with pytest.raises(ConfigError) as e:
        stage_plan.plan(_cfg(tmp_path, "stages=[sft]", "critique_revise.rounds=3", "critique_revise.few_shot=2"))
    assert e.value.errors == [f"critique_revise: its output in {cfg.path} is out of date: it was made with other "
                              "settings (critique_revise.few_shot: 1 -> 2; critique_revise.rounds: 2 -> 3), and sft "
                              "would read it; add critique_revise to stages to redo it"]
