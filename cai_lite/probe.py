"""The probe behind `plan=true`'s time estimate: load the base on the configured device, add a LoRA
adapter, and time the three kinds of work the stages do, each at two sizes so that a line (a fixed
cost per batch plus a cost per row or token) can be fitted:
  - sampling: generation.generate on real prompts, a full batch and a quarter of one (once each,
    after a short warm-up), at generation.max_new_tokens; also how far into it the answers ran;
  - a no-gradient forward (judges, reward scores, log-probs) on judge-length prompts, at
    judge.batch_size rows and at a quarter of them, and without the adapter at judge.batch_size;
  - a training step (forward, backward, AdamW) of the adapter at sft.batch_size rows and at one, and
    six steps of TRL's SFTTrainer (as the sft stage builds it, logging included) at sft.batch_size rows.
The forward and the training step run once to warm up, then twice, and the mean is kept.

Reads base.model and the prompt files; writes nothing. A few seconds on the tiny and lab recipes on
CPU; on a 7B model the two sampling batches dominate.

    python -c "from cai_lite.recipe import load_config; from cai_lite import probe; \
               print(probe.measure(load_config(['recipe=tiny_cpu'])))"
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from cai_lite import constitution as C
from cai_lite import checkpoint, data, estimate, generation, models, pipeline, planner, tracking
from cai_lite.config import Config, trl_args
from cai_lite.estimate import Rates


@dataclass
class Probe:
    rates: Rates
    answers: list[int]  # tokens of each answer of the full sampling batch (EOS included)
    max_new_tokens: int
    batch: int  # rows of the full sampling batch
    load_s: float  # loading the base
    seconds: float  # the whole probe, loading included
    tokenizer: object
    device: str


def _timed(fn, repeats: int = 2) -> float:
    fn()  # warm-up: first calls allocate, pick kernels, build caches
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _line(x1: float, y1: float, x2: float, y2: float) -> tuple[float, float]:
    """(intercept, slope) through two points, neither below 0 (noise can tilt a short probe's line)."""
    slope = max(0.0, (y1 - y2) / (x1 - x2)) if x1 != x2 else 0.0
    return max(0.0, y2 - slope * x2), slope


def _prompts(cfg: Config, tok, n: int) -> list[str]:
    """`n` of the run's red-team prompts, repeated if there are fewer."""
    texts = [p.text for p in data.prompt_split(cfg).train] or ["Hello"]
    return [texts[i % len(texts)] for i in range(n)]


def _counts(out: generation.Generated) -> tuple[int, int, int, list[int]]:
    """What a sampling call computed, by the loop's own count (decode.Stats): forwards, rows in flight
    summed over them, prompt positions prefilled, and each answer's tokens (EOS included)."""
    st = out.stats
    return st.forwards, st.decode, st.prefill, out.new_tokens


def measure(cfg: Config) -> Probe:
    """Time sampling, forward and training on `cfg`'s base and device (batch sizes already numbers)."""
    start = time.perf_counter()
    base = models.load_base(cfg)
    load_s = time.perf_counter() - start
    models.add_adapter(base, "probe")
    tok, g = base.tokenizer, cfg.generation
    full, part = g.batch_size, max(1, g.batch_size // 4)
    rendered = [data.render(tok, [{"role": "user", "content": p}]) for p in _prompts(cfg, tok, full)]

    # Forward first: its per-token cost prices the prefill inside the sampling probe.
    const = C.load(cfg.constitution)
    principle = const.preference[0].text if const.preference else C.HELPFUL_PRINCIPLE.text
    texts = _prompts(cfg, tok, 3 * cfg.judge.batch_size)
    judge = [data.render(tok, C.comparison_messages(data.conversation_text(a), principle, b, c), C.COMPARISON_PREFILL)
             for a, b, c in zip(texts[0::3], texts[1::3], texts[2::3])]

    def forward(rows: int, adapter: str | None = "probe") -> tuple[float, int]:
        enc, _ = generation.tokenize_left(base, judge[:rows], g.max_prompt_tokens)
        with torch.no_grad(), models.role(base, adapter) as model:
            s = _timed(lambda: model(**enc, position_ids=generation.positions(enc["attention_mask"]),
                                     logits_to_keep=1, use_cache=False))
        return s, int(enc["attention_mask"].numel())  # padded tokens: they cost what real ones do

    (f1, t1), (f2, t2) = forward(cfg.judge.batch_size), forward(max(1, cfg.judge.batch_size // 4))
    fwd_s, fwd_token_s = _line(t1, f1, t2, f2)
    bare = forward(cfg.judge.batch_size, None)[0] / f1  # a judge without an adapter skips every LoRA layer

    def sample(rows: int) -> tuple[float, tuple]:
        begin = time.perf_counter()
        out = generation.generate(base, rendered[:rows], "probe", g, desc="probe")
        return time.perf_counter() - begin, _counts(out)

    generation.generate(base, rendered[:2], "probe", g, max_new_tokens=2, desc="probe")  # warm-up
    s1, (fw1, fl1, pre1, answers) = sample(full)  # once each: a full batch on a 7B model takes a while
    s2, (fw2, fl2, pre2, _) = sample(part)
    # seconds - prefill = forwards x step_s + rows in flight x row_step_s, at both sizes: two equations.
    u1, u2 = s1 - pre1 * fwd_token_s, s2 - pre2 * fwd_token_s
    det = fw1 * fl2 - fw2 * fl1
    step_s, row_step_s = ((u1 * fl2 - u2 * fl1) / det, (fw1 * u2 - fw2 * u1) / det) if det else (0.0, u1 / fl1)
    if step_s < 0 or row_step_s < 0:  # noise tilted the line: all of it per row, or all per forward
        step_s, row_step_s = (0.0, u1 / fl1) if row_step_s > 0 else (u1 / fw1, 0.0)

    seqs = [r + " " + " ".join(["word"] * (g.max_new_tokens // 2)) for r in rendered]  # an answer's worth more

    def train(rows: int) -> tuple[float, int]:
        enc, _ = generation.tokenize_left(base, seqs[:rows], cfg.sft.max_seq_len)
        params = models.adapter_parameters(base, "probe")
        opt = torch.optim.AdamW(params, lr=1e-9)

        def step():
            with models.role(base, "probe", trainable=True) as model, models.training_mode(base):
                loss = model(**enc, labels=enc["input_ids"]).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
        return _timed(step), int(enc["attention_mask"].numel())

    (r1, n1), (r2, n2) = train(min(cfg.sft.batch_size, full)), train(1)
    train_s, train_token_s = _line(n1, r1, n2, r2)
    step, tokens = _trainer_step(cfg, base, _prompts(cfg, tok, 7 * cfg.sft.batch_size),
                                 " ".join(["word"] * (g.max_new_tokens // 2)))
    trl = step / (train_s + tokens * train_token_s)
    models.delete_adapter(base, "probe")
    longest, mean = max(answers), sum(answers) / len(answers)
    rates = Rates(step_s, row_step_s, fwd_s, fwd_token_s, train_s, train_token_s,
                  longest if longest < g.max_new_tokens else None, mean if mean < g.max_new_tokens else None,
                  bare=bare, trl=trl)
    return Probe(rates, answers, g.max_new_tokens, full, load_s, time.perf_counter() - start, tok, str(base.device))


def _trainer_step(cfg: Config, base: models.SharedBase, prompts: list[str], answer: str) -> tuple[float, float]:
    """Seconds from one step of TRL's SFTTrainer to the next (its metrics, logging and the next batch
    included) as the sft stage builds it, at sft.batch_size rows, after the first; and the padded
    tokens of such a step. TensorBoard logs, where report_to has it, go to a temporary folder; the
    other trackers are left out (they would start runs of their own)."""
    from datasets import Dataset
    from torch.utils.tensorboard import SummaryWriter
    from transformers import TrainerCallback
    from transformers.integrations import TensorBoardCallback
    from trl import SFTConfig, SFTTrainer

    class Clock(TrainerCallback):
        def __init__(self):
            self.begins: list[float] = []

        def on_step_begin(self, *args, **kwargs):
            self.begins.append(time.perf_counter())

    rows = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": answer}]}
            for p in prompts]
    clock, b = Clock(), cfg.sft.batch_size
    with tempfile.TemporaryDirectory() as tmp, models.role(base, "probe", trainable=True) as model:
        args = SFTConfig(**trl_args(cfg, base.device.type, Path(tmp)), per_device_train_batch_size=b, max_steps=6,
                         learning_rate=1e-9, max_length=cfg.sft.max_seq_len, completion_only_loss=True)
        logs = [checkpoint.JsonlLog(Path(tmp) / "train_log.jsonl"), clock]
        if "tensorboard" in cfg.report_to:
            logs.append(TensorBoardCallback(SummaryWriter(str(Path(tmp) / "tensorboard"))))
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=base.tokenizer, callbacks=logs)
        tracking.quiet(trainer, "probe").train()
        lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    base.model.eval()
    gaps = [b2 - b1 for b1, b2 in zip(clock.begins[1:], clock.begins[2:])]  # steps 2..6
    return sum(gaps) / len(gaps), b * estimate.padded(lengths, b)


def timed_work(cfg: Config) -> tuple[dict[str, list[estimate.Work]], Probe]:
    """Each selected stage's work, counted at the batch sizes of a run on this device, and the probe
    that prices it (estimate.stage_seconds)."""
    cfg = pipeline.resolve_auto(cfg)
    p = measure(cfg)
    return estimate.count(cfg, p.tokenizer, p.answers), p


def report(cfg: Config) -> str:
    """The time table `plan=true` prints after the memory plan: priced by a probe where base.model
    has weights (or base.init=random) and plan.probe is on, the work counts alone where not, and why
    neither where the base is not built yet."""
    folder = Path(cfg.base.model)
    if cfg.plan.shape:
        return "time estimate: none: plan.shape plans another model than base.model, which the probe would time"
    if not (folder / "config.json").is_file():
        return (f"time estimate: none yet: {cfg.base.model} is not built (base.create={cfg.base.create} builds it "
                "on the first run); run once, then plan=true times each stage")
    if not cfg.plan.probe or not (any(folder.glob("*.safetensors")) or cfg.base.init == "random"):
        why = "plan.probe=false" if not cfg.plan.probe else f"{cfg.base.model} holds no weights to time"
        cfg = planner.with_picks(cfg, planner.auto_picks(cfg, int(cfg.plan.gpu_memory_gb * planner.GiB),
                                                         "plan.gpu_memory_gb"))
        tok = AutoTokenizer.from_pretrained(cfg.base.model, trust_remote_code=cfg.base.trust_remote_code)
        lines, _ = estimate.table(estimate.count(cfg, tok), None)
        return "\n".join([f"work per stage (no time estimate: {why}; generated texts counted at max_new_tokens)",
                          *lines])
    work, p = timed_work(cfg)
    lines, total = estimate.table(work, p.rates)
    return "\n".join([f"time estimate on {p.device} (base.device={cfg.base.device}), from a {p.seconds:.1f} s probe "
                      "that measured:", *estimate.rate_lines(p.rates, p.batch, p.max_new_tokens), *lines,
                      f"seconds = each stage's counts at the rates above, plus its fixed set-up (estimate.FIXED); "
                      f"loading the base ({p.load_s:.1f} s) comes once on top. Total {total / 60:.1f} minutes."])
