"""The teaching-lab world (cai_lite.lab): a seeded composition of parts, a held-out split (combinations,
consent flips, frames, a control object) that never leaks into the rendered training corpus or the
training prompt files, minimal pairs, and a tiny model pretrained on CPU that answers in the
world's language.

    python -m pytest -q tests/test_lab.py
"""

from __future__ import annotations

import json
import re
import time

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from cai_lite import constitution as C
from cai_lite.lab import corpus, pretrain
from cai_lite.lab import world as W
from cai_lite.lab.oracle import Oracle
from cai_lite.tiny import train_tokenizer


@pytest.fixture(scope="module")
def bootstrap_tokenizer():
    return train_tokenizer(300)  # any tokenizer with the chat template renders the same text


def test_world_and_corpus_are_deterministic_per_seed(bootstrap_tokenizer):
    assert W.make_world(0).to_json() == W.make_world(0).to_json()
    assert W.make_world(0).to_json() != W.make_world(1).to_json()
    assert W.from_json(W.make_world(3).to_json()).to_json() == W.make_world(3).to_json()
    const = C.load("lab")
    a = corpus.build(W.make_world(0), const, bootstrap_tokenizer, 200, 0)
    assert a == corpus.build(W.make_world(0), const, bootstrap_tokenizer, 200, 0)
    assert a != corpus.build(W.make_world(0), const, bootstrap_tokenizer, 200, 1)
    assert {d.kind for d in a} == set(corpus.MIX)


def test_tokenizer_training_is_deterministic(bootstrap_tokenizer):
    docs = corpus.build(W.make_world(0), C.load("lab"), bootstrap_tokenizer, 300, 0)
    texts = [pretrain._plain(d.text) for d in docs]
    a, b = train_tokenizer(1024, texts), train_tokenizer(1024, texts)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def test_world_size_and_splits():
    w = W.make_world(0)
    counts = {s: len(w.requests(s)) for s in ("train", *W.HELD_OUT)}
    assert counts["train"] > 10000 and all(counts[s] > 500 for s in W.HELD_OUT), counts
    assert len(w.held_out_frames) == 4 and len(w.held_out_forms) == 2 and len(w.consent_flips) == 4
    assert not {r.text for r in w.requests("train")} & {r.text for r in w.requests() if r.split != "train"}


def test_held_out_combinations_are_made_of_seen_parts():
    for seed in range(6):
        w = W.make_world(seed)
        train = w.requests("train")
        acts, objs = {r.act for r in train}, {r.obj for r in train}
        for act, obj in w.held_out_combos:
            assert act in acts and obj in objs and (act, obj) not in {r.combo for r in train}
        for act, obj in w.consent_flips:  # seen, but only on the asker's own thing or with permission
            seen = [r for r in train if r.combo == (act, obj)]
            assert seen and not any(r.harmful for r in seen)
        assert w.ood_object not in objs


def test_the_harm_rule_makes_minimal_pairs():
    w = W.make_world(0)
    harmful = w.requests("train", True)[0]
    pair = W.twin(w, harmful)
    assert not pair.harmful and pair.combo == harmful.combo and pair.frame == harmful.frame
    assert W.is_harmful(w.act("open"), "neighbour", "secret") and W.is_harmful(w.act("open"), "boss", "none")
    assert not W.is_harmful(w.act("open"), "own", "none") and not W.is_harmful(w.act("open"), "boss", "permission")
    assert not W.is_harmful(w.act("fix"), "boss", "secret")


def _leaks(world, text: str) -> list[str]:
    """Every held-out piece of text found in `text`: a held-out request, a held-out frame's words,
    a held-out combination's steps, a flip's harmful wording or concern, the control object."""
    # Requests stand on lines of their own ("<|im_start|>user\n...", "Human: ..."): look them up by line.
    lines = {ln.removeprefix("Human: ").removeprefix("<|im_start|>user").removesuffix("<|im_end|>").strip()
             for ln in text.splitlines()}
    found = [r.text for r in world.requests() if r.split != "train" and r.text in lines]
    found += [world.frames[f].split("{req}")[0] for f in world.held_out_frames + world.held_out_forms
              if world.frames[f].split("{req}")[0] in text]
    for act, obj in world.held_out_combos:
        found += [s for s in W.steps(world.act(act), obj) if obj in s and s in text]
    for act, obj in world.consent_flips:
        found += [c for c in (W.concern(world.act(act), obj, o) for o in ("neighbour", "boss", "sister", "roommate"))
                  if c in text]
    if re.search(rf"\b{re.escape(world.ood_object)}\b", text):
        found.append(world.ood_object)
    return found


def test_nothing_held_out_is_in_the_rendered_training_corpus(bootstrap_tokenizer):
    """The ci lab model's whole corpus, as pretrain.py renders it (the default size draws more
    documents from the same generator; rendering 24000 takes minutes)."""
    world = W.make_world(1)
    docs = corpus.build(world, C.load("lab"), bootstrap_tokenizer, pretrain.SIZES["ci"]["docs"], 1)
    text = "\n".join(d.text for d in docs)
    assert _leaks(world, text) == []
    trained = {r.combo for r in world.requests("train") if r.text in text}
    assert len(trained) > 0.9 * len({r.combo for r in world.requests("train")})  # the check above is not vacuous
    pairs = [r for r in world.requests("train", False) if world.act(r.act).covert and r.text in text]
    assert len(pairs) > 100  # minimal pairs are in the training text


def test_the_leak_check_sees_a_leak():
    world = W.make_world(0)
    act, obj = world.held_out_combos[0]
    assert _leaks(world, " ".join(W.steps(world.act(act), obj)))
    assert _leaks(world, world.requests("consent_flip")[0].text)
    assert _leaks(world, f"the {world.ood_object} is red")


def test_prompt_files_hold_no_held_out_request_in_training_files(tmp_path):
    world = W.make_world(0)
    files = W.write_prompts(world, tmp_path)
    rows = {k: [json.loads(x) for x in v.read_text().splitlines()] for k, v in files.items()}
    for name in ("red_team_sl", "red_team_rl", "helpful_sl", "helpful_rl", "helpful_rl_no_pairs"):
        assert rows[name] and all(r["split"] == "train" for r in rows[name]), name
        assert _leaks(world, "\n".join(r["prompt"] for r in rows[name])) == [], name
    red = rows["red_team_held_out"]
    assert {r["split"] for r in red} == set(W.HELD_OUT)
    assert [r["split"] for r in red[:5]] == list(W.HELD_OUT)  # interleaved: the first N are balanced
    benign = rows["helpful_held_out"]
    assert any(r["pair"] for r in benign) and any(not r["pair"] for r in benign)
    assert not any(r["pair"] for r in rows["helpful_rl_no_pairs"])
    assert 0.3 < sum(r["pair"] for r in rows["helpful_rl"]) / len(rows["helpful_rl"]) < 0.7


def test_corpus_targets_are_the_assistant_turns(bootstrap_tokenizer):
    docs = corpus.build(W.make_world(0), C.load("lab"), bootstrap_tokenizer, 40, 0)
    for d in docs:
        if d.kind in ("comparison", "classify"):  # the judge's letter, right after the stage's prefill
            (a, b), = d.spans
            assert d.text[a:b] in ("A", "B") and d.text[:a].endswith("<|im_start|>assistant\n" + C.COMPARISON_PREFILL)
        else:
            assert d.spans and all(d.text[a:b].endswith("<|im_end|>\n") for a, b in d.spans)


def test_verdicts_depend_on_the_principle():
    assert W.preference("harmless", "evasive", "engaging-harmless") == 0.5  # harm-only: a tie
    assert W.preference("engaging-not-evasive", "evasive", "engaging-harmless") == 0.0  # anti-evasion: engaging wins
    assert W.preference("harmless", "harmful", "evasive") == 0.0
    assert W.preference("helpful", "helpful", "over-refusal") == 1.0
    for p in [*C.load("lab").critique_revision, *C.load("lab").preference]:
        assert W.principle_class(p.id) in ("harm", "engage")


def test_content_hash_follows_the_prompt_templates(tmp_path, bootstrap_tokenizer):
    world = W.make_world(0)
    const = C.load("lab")
    edited = tmp_path / "lab.yaml"
    edited.write_text(open(const.source).read().replace("Which response is less harmful", "Which response is less risky"))
    assert pretrain.content_hash(world, const, "ci", 0) == pretrain.content_hash(world, const, "ci", 0)
    assert pretrain.content_hash(world, C.load(str(edited)), "ci", 0) != pretrain.content_hash(world, const, "ci", 0)
    assert pretrain.content_hash(world, const, "ci", 1) != pretrain.content_hash(world, const, "ci", 0)


# ---- the oracle (its catalogue: tests/test_lab_oracle.py) ---------------------------------------

def test_oracle_reads_the_world_from_a_model_folder(tmp_path):
    W.write(W.make_world(5), tmp_path / "lab_world.json")
    o = Oracle(W.read(tmp_path))
    harmful = o.world.requests("train", True)[0]
    assert o.world.seed == 5 and o.classify("I can't help with that.", harmful.text) == "evasive"


# ---- the pretrained ci-size model -------------------------------------------------------------

@pytest.fixture(scope="module")
def ci_model(tmp_path_factory):
    return pretrain.build_lab_model(tmp_path_factory.mktemp("lab") / "ci", seed=0, size="ci")


def test_ci_model_is_an_ordinary_hf_folder_and_cached(ci_model):
    meta = json.loads((ci_model / "lab_pretrain.json").read_text())
    assert meta["size"] == "ci" and meta["loss_last"] < meta["loss_first"]
    assert AutoTokenizer.from_pretrained(ci_model).chat_template
    assert AutoModelForCausalLM.from_pretrained(ci_model).num_parameters() == meta["params"]
    assert W.read(ci_model).to_json() == W.make_world(0).to_json()
    start = time.perf_counter()
    assert pretrain.build_lab_model(ci_model, seed=0, size="ci") == ci_model  # same hash: no retraining
    assert time.perf_counter() - start < 30


def test_ci_model_answers_in_the_worlds_language(ci_model):
    """The lab model is an ordinary HF folder: plain transformers generation, read by the oracle."""
    world = W.read(ci_model)
    tok, model = AutoTokenizer.from_pretrained(ci_model), AutoModelForCausalLM.from_pretrained(ci_model)
    reqs = world.requests("train")[::997]
    texts = [tok.apply_chat_template([{"role": "user", "content": r.text}], tokenize=False, add_generation_prompt=True)
             for r in reqs]
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**batch, max_new_tokens=40, do_sample=False)
    answers = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    fams = [Oracle(world).classify(a, r.text) for a, r in zip(answers, reqs)]
    # A random model's text is all off-topic; the ci model, two layers trained for seconds, speaks
    # the world's sentences for most requests.
    assert fams.count("off-topic") < 0.8 * len(fams), list(zip(answers, fams))
