"""The sampling loop (cai_lite/decode.py) against transformers' `generate`: greedy tokens equal today's
fixed batches token for token on two model families, answers come back in prompt order, sampled rows
do not depend on how they are batched, and sampling draws from the distribution it claims.

    python -m pytest tests/test_decode.py -q
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cai_lite import data, decode, generation, models, rollout
from cai_lite.config import GenerationSettings
from cai_lite.recipe import load_config

from conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent

QUESTIONS = ["Hi", "Tell me something long about the sea and the sky, and the ships on it, please.", "Why?",
             "How do I bake bread at home with flour, water, salt and yeast?", "a b c", "What is the capital of France?",
             "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 2024", "Can you help me write a poem about the sea?"]


def _base(model_dir, tmp_path):
    """An NF4 base whose `sft` adapter computes something (PEFT starts LoRA B at zero), and whose EOS
    row in the LM head makes greedy answers end at different lengths."""
    base = models.load_base(tiny_config(tmp_path, model_dir))
    models.add_adapter(base, "sft")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in base.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    prompts = _rendered(base)
    head = base.model.get_output_embeddings().weight
    eos = models.eos_ids(base)[0]
    enc, _ = generation.tokenize_left(base, prompts, 1024)
    with torch.no_grad(), models.role(base, "sft"):
        h = rollout.last_hidden(base, enc["input_ids"], enc["attention_mask"])[enc["attention_mask"].bool()]
    direction = h.mean(0) / h.mean(0).norm()  # where the hidden states point on average
    with torch.no_grad():
        for scale in torch.linspace(0.05, 3, 60):  # the first scale at which the greedy answers' lengths spread out
            head[eos] = scale * direction
            lengths = [len(r) for r in _generate_fixed(base, prompts, 3, 24, "sft")]
            if len(set(lengths)) >= 4 and max(lengths) == 24:
                return base
    raise AssertionError(f"no EOS scale spreads the greedy answer lengths: {lengths}")


def _rendered(base) -> list[str]:
    return [data.render(base.tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


@torch.no_grad()
def _generate_fixed(base, prompts: list[str], batch: int, max_new: int, adapter, **sampling) -> list[list[int]]:
    """Today's path: `model.generate` over fixed batches in prompt order; each row to its first EOS."""
    eos, out = models.eos_ids(base), []
    with models.role(base, adapter) as model:
        for i in range(0, len(prompts), batch):
            enc, _ = generation.tokenize_left(base, prompts[i:i + batch], 1024)
            res = model.generate(**enc, max_new_tokens=max_new, eos_token_id=eos,
                                 pad_token_id=base.tokenizer.pad_token_id, **(sampling or {"do_sample": False}))
            for row in res[:, enc["input_ids"].shape[1]:].tolist():
                end = next((k for k, t in enumerate(row) if t in eos), None)
                out.append(row[: end + 1] if end is not None else row)
    return out


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def base(request, tiny_llama, tiny_qwen2, tmp_path_factory):
    return _base(tiny_llama if request.param == "llama" else tiny_qwen2, tmp_path_factory.mktemp("decode"))


def _texts(base, rows: list[list[int]]) -> list[str]:
    eos = models.eos_ids(base)
    return [base.tokenizer.decode(r[:-1] if r and r[-1] in eos else r, skip_special_tokens=True).strip() for r in rows]


@pytest.mark.parametrize("slots", [1, 3, 8])
def test_greedy_equals_todays_fixed_batches_token_for_token(base, slots):
    prompts = _rendered(base)
    want = _generate_fixed(base, prompts, 4, 24, "sft")
    g = GenerationSettings(batch_size=slots, max_new_tokens=24, temperature=0.0)
    got = generation.generate(base, prompts, "sft", g)
    assert got.texts == _texts(base, want)
    assert got.new_tokens == [len(r) for r in want] and got.ended == [r[-1] in models.eos_ids(base) for r in want]
    assert 1 < len(set(got.new_tokens)) and any(got.ended) and not all(got.ended)  # rows ended at different steps
    if slots == 3:  # fewer slots than prompts: rows were refilled and the cache was joined and trimmed
        assert got.stats.peak_rows == 3 and got.stats.forwards > 24


def test_answers_follow_their_prompts_in_any_order(base):
    prompts = _rendered(base)
    g = GenerationSettings(batch_size=3, max_new_tokens=24, temperature=0.0)
    straight = generation.generate(base, prompts, "sft", g).texts
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    shuffled = generation.generate(base, [prompts[i] for i in order], "sft", g).texts
    assert shuffled == [straight[i] for i in order] and len(set(straight)) == len(prompts)


def test_sampled_rows_do_not_depend_on_the_batching(base):
    prompts = _rendered(base) * 2
    runs = []
    for slots in (1, 4, 16):
        torch.manual_seed(3)  # as a stage seeds each shard
        runs.append(generation.generate(base, prompts, "sft", GenerationSettings(batch_size=slots, max_new_tokens=24,
                                                                                 temperature=0.9)).texts)
    assert runs[0] == runs[1] == runs[2]
    assert runs[0][:8] != runs[0][8:]  # each row has its own seed: a repeated prompt gets another answer
    torch.manual_seed(4)
    assert generation.generate(base, prompts, "sft", GenerationSettings(batch_size=4, max_new_tokens=24,
                                                                         temperature=0.9)).texts != runs[0]


def test_decode_positions_count_only_live_rows(base):
    prompts = _rendered(base)
    got = generation.generate(base, prompts, "sft", GenerationSettings(batch_size=8, max_new_tokens=24, temperature=0.0))
    # All rows start together and leave as they end: every decode position but the waiting prompts'
    # made a kept token, so nothing was computed for finished rows.
    assert got.stats.decode == sum(n - 1 for n in got.new_tokens) and got.stats.wasted_share() == 0.0
    longest = max(len(r) for r in _generate_fixed(base, prompts, 8, 24, "sft"))
    assert got.stats.decode < 8 * (longest - 1)  # one fixed batch computes every row until the longest ends


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_sampling_draws_from_the_warped_softmax(base, temperature, top_p):
    """First tokens of 16000 rows against the model's own distribution after temperature and top-p:
    the total variation is no larger than 16000 draws of torch.multinomial give, far from the
    distribution at the wrong temperature, and no token outside the top-p set is ever drawn."""
    ids = base.tokenizer(_rendered(base)[0], add_special_tokens=False)["input_ids"]
    n = 16000
    with models.role(base, "sft") as model, torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        sampling = decode.Sampling(temperature, top_p=top_p, top_k=0)
        rows, _ = decode.decode(model, [ids] * n, max_new_tokens=1, eos=[-1], pad=0, slots=1000, sampling=sampling,
                                seeds=list(range(n)), device=base.device, progress=False)
    drawn = torch.bincount(torch.tensor([r[0] for r in rows]), minlength=len(logits)).float() / n

    def warped(t: float) -> torch.Tensor:
        p = torch.softmax(logits / t, -1)
        sp, idx = p.sort(descending=True)
        keep = sp.cumsum(0) - sp < top_p  # the smallest set with mass >= top_p, as TopPLogitsWarper keeps
        q = torch.zeros_like(p)
        q[idx[keep]] = sp[keep]
        return q / q.sum()

    want, wrong = warped(temperature), warped(temperature * 2)
    tv = lambda a, b: 0.5 * (a - b).abs().sum().item()  # noqa: E731
    g = torch.Generator().manual_seed(0)
    noise = max(tv(torch.bincount(torch.multinomial(want, n, True, generator=g), minlength=len(want)) / n, want)
                for _ in range(5))  # what sampling error alone gives
    assert tv(drawn, want) < 1.25 * noise and tv(drawn, wrong) > 2 * noise, (tv(drawn, want), tv(drawn, wrong), noise)
    assert drawn[want == 0].sum() == 0


def test_a_generation_config_setting_the_loop_does_not_apply_is_named(nf4_base, caplog, monkeypatch):
    gc = nf4_base.model.generation_config
    monkeypatch.setattr(gc, "no_repeat_ngram_size", 3)
    with caplog.at_level(logging.WARNING, logger="cai_lite.generation"):
        generation.generate(nf4_base, ["Hello"], None, GenerationSettings(max_new_tokens=2, temperature=0.7))
    assert "no_repeat_ngram_size" in caplog.text


def test_repetition_penalty_from_the_generation_config_is_applied_as_generate_applies_it(nf4_base, monkeypatch):
    base = nf4_base
    monkeypatch.setattr(base.model.generation_config, "repetition_penalty", 3.0)
    prompts = _rendered(base)[:4]
    want = _generate_fixed(base, prompts, 4, 12, None)
    got = generation.generate(base, prompts, None, GenerationSettings(batch_size=2, max_new_tokens=12, temperature=0.0))
    assert got.texts == _texts(base, want)
    monkeypatch.setattr(base.model.generation_config, "repetition_penalty", 1.0)
    assert generation.generate(base, prompts, None, GenerationSettings(batch_size=2, max_new_tokens=12,
                                                                        temperature=0.0)).texts != got.texts


def test_an_unresolved_auto_batch_size_is_refused(nf4_base):
    g = load_config(["recipe=tiny_cpu"]).generation
    g.batch_size = "auto"
    with pytest.raises(ValueError, match="generation.batch_size"):
        generation.generate(nf4_base, ["Hello"], None, g)


def test_a_shared_prefix_is_computed_once_and_changes_no_token(base):
    """Prompts that open alike (as critique prompts open with the same demonstration) prefill their
    common tokens once; greedy answers still equal today's, and the prefix's positions are not recomputed."""
    lead = [{"role": "user", "content": "Here is how a careful assistant answers. " * 6},
            {"role": "assistant", "content": "Understood, I will answer carefully."}]
    prompts = [data.render(base.tokenizer, lead + [{"role": "user", "content": q}]) for q in QUESTIONS]
    ids = base.tokenizer(prompts, add_special_tokens=False)["input_ids"]
    want = _generate_fixed(base, prompts, 4, 24, "sft")
    got = generation.generate(base, prompts, "sft", GenerationSettings(batch_size=4, max_new_tokens=24, temperature=0.0))
    assert got.texts == _texts(base, want) and got.new_tokens == [len(r) for r in want]
    assert got.stats.prompt == sum(map(len, ids)) and got.stats.prefill < 0.6 * got.stats.prompt
    torch.manual_seed(1)
    g = GenerationSettings(batch_size=4, max_new_tokens=24, temperature=0.9)
    sampled = generation.generate(base, prompts, "sft", g).texts
    torch.manual_seed(1)
    with models.role(base, "sft") as model:
        rows, _ = decode.decode(model, ids, max_new_tokens=24, eos=models.eos_ids(base), pad=0, slots=4,
                                sampling=generation.sampling_settings(model, 0.9, g.top_p),
                                seeds=generation.row_seeds(len(ids)), device=base.device, progress=False,
                                share_prefix=False)
    assert sampled == _texts(base, rows)  # the same rows with the prefix computed per row


def test_the_sampling_benchmark_runs_its_gpu_path_on_a_tiny_shape(tmp_path):
    """benchmarks/sampling.py --gpu --tiny: the GPU mode's code (random-init Qwen2.5 shape, EOS
    calibration, every path, the rollout) on CPU, so the script a GPU session runs once cannot rot."""
    out = tmp_path / "sampling.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sampling.py"), "--gpu", "--tiny", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["greedy_equal"][0] == res["greedy_equal"][1] > 0
    paths = res["critique_revise"]
    assert set(paths) == {"fixed", "sorted", "refill_unshared", "refill"}
    assert paths["refill"]["wasted_share"] == 0 < paths["fixed"]["wasted_share"]  # answers ended at different lengths
    assert all(v["useful_tokens"] > 0 and v["useful_per_s"] > 0 for v in [*paths.values(), *res["ppo_rollout"].values()])
    assert "refill / fixed" in p.stdout
