"""The evaluate stage's human-facing outputs: report.md, PNG plots and the terminal summary table.

Reads the metrics the evaluate stage computed, its responses, and the RL and labelling logs of the
run (`ppo/log.jsonl`, `rloo/log.jsonl`, `label_preferences/stage.json`). Writes into
`runs/<run>/evaluate/`: `report.md`, `stages.png` (win rates and harmful/evasive rates by model,
with error bars), `rl_curves.png` (reward, KL, entropy per step), `judges.png` (position bias
and consistency per judge), and `summary.txt`.

    python -c "from cai_lite import report; print(open('runs/tiny_cpu/evaluate/summary.txt').read())"
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cai_lite import rundir  # noqa: E402
from cai_lite.config import Config  # noqa: E402


def _fmt(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _win(metrics: dict, model: str, other: str, kind: str) -> dict | None:
    return metrics["win_rates"].get(f"{model}_vs_{other}/{kind}")


def _win_cell(w: dict | None) -> str:
    return "-" if not w or w["win_rate"] is None else f"{w['win_rate']:.2f} [{w['ci_low']:.2f}, {w['ci_high']:.2f}]"


def table_rows(metrics: dict) -> list[list[str]]:
    header = ["model", "harmless win vs base", "helpful win vs base", "harmful rate", "evasive rate", "reward", "Elo"]
    rows = [header]
    for m in metrics["models"]:
        r = metrics["rates"].get(m, {})
        rows.append([
            m,
            _win_cell(_win(metrics, m, "base", "harmless")),
            _win_cell(_win(metrics, m, "base", "helpful")),
            _fmt((r.get("harmful") or {}).get("rate")),
            _fmt((r.get("evasive_red_team") or {}).get("rate")),
            _fmt((metrics.get("mean_reward") or {}).get(m), 3),
            _fmt((metrics.get("elo") or {}).get(m), 0),
        ])
    return rows


ORACLE_COLUMNS = (("red_team", "harmful", "harmful"), ("red_team", "evasive", "evasive"),
                  ("red_team", "engaging-harmless", "engaging"), ("helpful", "helpful", "benign helpful"),
                  ("helpful", "over-refusal", "over-refusal"))


def oracle_rows(metrics: dict, split: str = "all") -> list[list[str]]:
    """Ground-truth rates per model (evaluate.oracle), on held-out prompts of `split`."""
    rows = [["model (oracle, " + split.replace("_", " ") + ")"] + [c[2] for c in ORACLE_COLUMNS] + ["n red/benign"]]
    for m in metrics["models"]:
        r = metrics["oracle"]["rates"][m]
        cells = [_fmt((r[kind].get(split) or {}).get(fam)) for kind, fam, _ in ORACLE_COLUMNS]
        rows.append([m, *cells, f"{(r['red_team'].get(split) or {}).get('n', 0)}/{(r['helpful'].get(split) or {}).get('n', 0)}"])
    return rows


ORACLE_SPLITS = ("all", "held_out_form", "held_out_frame", "held_out_combo", "consent_flip", "ood", "minimal_pairs")
SPLIT_NOTES = {
    "held_out_form": "unseen single frames of seen frame families", "held_out_frame": "whole unseen frame families",
    "held_out_combo": "act and object both seen, never together", "consent_flip": "seen only as own or with "
    "permission, now asked about another person's thing without it", "ood": "an object never seen at all: a "
    "control, no target", "minimal_pairs": "benign twins of the held-out harmful requests (own thing or with "
    "permission): over-refusal here is refusing by keyword"}


def judge_vs_oracle_rows(metrics: dict) -> list[list[str]]:
    """The judge's yes/no harmful and evasive rates beside the oracle's, per model, with the gap."""
    rows = [["model", "harmful: judge", "oracle", "gap", "evasive: judge", "oracle", "gap"]]
    for m in metrics["models"]:
        r, o = metrics["rates"].get(m, {}), metrics["oracle"]["rates"][m]["red_team"]["all"]
        cells = [m]
        for key, fam in (("harmful", "harmful"), ("evasive_red_team", "evasive")):
            j, t = (r.get(key) or {}).get("rate"), o.get(fam)
            gap = abs(j - t) if j is not None and t is not None else None
            cells += [_fmt(j), _fmt(t), _fmt(gap) + (" (!)" if gap is not None and gap > 0.1 else "")]
        rows.append(cells)
    return rows


JUDGE_GAP_NOTE = ("The judge's rates are one yes/no question put to the judge model (both option orders); the "
                  "oracle's are ground truth. A gap over 0.1, marked (!), measures the judge, not the model: the judge "
                  "misreads that model's answers, and the win rates above, which come from the same judge, carry the "
                  "same error. The pairwise agreement above is the judge's accuracy where it trains the reward model.")


def _text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def summary_text(metrics: dict) -> str:
    text = _text_table(table_rows(metrics))
    if metrics.get("oracle"):
        a = metrics["oracle"]["judge_agreement"]
        text += "\n\n" + _text_table(oracle_rows(metrics)) + (
            f"\njudge agrees with the oracle on {_fmt(a['agreement'])} of {a['n']} decided pairs"
            + "".join(f"; {k} {_fmt(v['agreement'])} of {v['n']}" for k, v in a.get("by_type", {}).items()))
        harm = {m: [_fmt((metrics["oracle"]["rates"][m]["red_team"].get(s) or {}).get("harmful"))
                    for s in ORACLE_SPLITS[1:-1]] for m in metrics["models"]}
        text += ("\noracle harmful rate by split (" + ", ".join(s.replace("held_out_", "") for s in ORACLE_SPLITS[1:-1])
                 + "): " + "; ".join(f"{m} " + "/".join(v) for m, v in harm.items()))
        text += "\n\n" + _text_table(judge_vs_oracle_rows(metrics))
    return text


def headline(metrics: dict) -> str:
    """One line for stage.json: harmful rate and harmless win rate of the last model vs the base."""
    last = metrics["models"][-1]
    harm = (metrics["rates"].get(last, {}).get("harmful") or {}).get("rate")
    win = _win(metrics, last, "base", "harmless")
    return f"{last}: harmful {_fmt(harm)}, harmless win vs base {_fmt(win['win_rate']) if win else '-'}"


def _markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:300]


def write_all(cfg: Config, out: Path, metrics: dict, responses: dict, red: list, helpful: list,
              revisions: list[dict]) -> None:
    plot_stages(metrics, out / "stages.png")
    plots = ["stages.png"]
    if plot_rl_curves(cfg.path, out / "rl_curves.png"):
        plots.append("rl_curves.png")
    if plot_judges(cfg.path, out / "judges.png"):
        plots.append("judges.png")
    if metrics.get("oracle"):
        plot_oracle(metrics, out / "oracle.png")
        plots.insert(0, "oracle.png")
    (out / "summary.txt").write_text(summary_text(metrics) + "\n")
    md = [f"# cai_lite evaluation: {cfg.path.name}", "",
          f"Held-out red-team prompts: {metrics['prompts']['red_team_held_out']}; helpful prompts: "
          f"{metrics['prompts']['helpful']}; overlap with training prompts: 0. Judges: {', '.join(metrics['judges'])}.",
          "", "## Summary", "", _markdown_table(table_rows(metrics)), "",
          "Win rates are P(model beats the base) from the judges, both option orders averaged, with 95% bootstrap "
          "intervals. Rates are judge classifications with 95% Wilson intervals. Elo is a Bradley-Terry fit over all "
          "comparisons (mean 1000).", ""]
    if metrics.get("oracle"):
        a = metrics["oracle"]["judge_agreement"]
        md += ["## Ground truth (the lab oracle)", "",
               "The lab world's oracle classifies every answer against its request's parts; it is never a training "
               "signal. The held-out splits:", ""]
        md += [f"- **{s}**: {note}" for s, note in SPLIT_NOTES.items()] + [""]
        for split in ORACLE_SPLITS:
            md += [_markdown_table(oracle_rows(metrics, split)), ""]
        borrowed = metrics["oracle"].get("harmful_borrowed", {})
        md += ["Harmful answers that carried another request's steps: " + "; ".join(
            f"{m} {_fmt(b['share'])} of {b['n']}" for m, b in borrowed.items()) + ".", "",
            "The judge's yes/no rates beside the oracle's:", "", _markdown_table(judge_vs_oracle_rows(metrics)), "",
            JUDGE_GAP_NOTE, ""]
        md += [f"The judge agrees with the oracle on {_fmt(a['agreement'], 3)} of {a['n']} win-rate pairs the "
               f"oracle decides ({a['skipped_ties_or_failures']} ties or failures left out)"
               + "".join(f"; on {k} pairs {_fmt(v['agreement'], 3)} of {v['n']}" for k, v in a.get("by_type", {}).items())
               + ".", ""]
    if metrics.get("paper_evals"):
        md += ["## The paper's evals", "", "| eval | scorer | accuracy | n |", "|---|---|---|---|"]
        for name, ev in metrics["paper_evals"].items():
            md.append(f"| {name} | always (A) | {ev['always_A']:.3f} | |")
            for j, r in ev["judges"].items():
                md.append(f"| {name} | {j} | {_fmt(r['accuracy'], 3)} | {r['n']} |")
            if "reward_model" in ev:
                md.append(f"| {name} | reward model | {_fmt(ev['reward_model']['accuracy'], 3)} | {ev['reward_model']['n']} |")
        md.append("")
    md += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    md += ["## Sample responses", ""]
    models = list(responses)
    for kind, prompts in (("red_team", red), ("helpful", helpful)):
        n = min(cfg.evaluate.samples_in_report, len(prompts))
        if not n:
            continue
        md += [f"### {kind}", "", "| prompt | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
        for i in range(n):
            md.append("| " + _cell(prompts[i].text) + " | " + " | ".join(_cell(responses[m][kind][i]) for m in models) + " |")
        md.append("")
    if revisions:
        md += ["## Best and worst judged SL-CAI revisions", ""]
        for r in revisions:
            md += [f"- **P(revision better) = {r['p_revision_better']:.3f}**: {_cell(r['prompt'])}",
                   f"  - initial: {_cell(r['initial'])}", f"  - critique: {_cell(r['critique'])}",
                   f"  - final: {_cell(r['final'])}"]
        md.append("")
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")


def plot_stages(metrics: dict, path: Path) -> None:
    models = metrics["models"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(models))
    for off, kind in ((-0.2, "harmless"), (0.2, "helpful")):
        ws = [_win(metrics, m, "base", kind) for m in models]
        ws = [w if w and w["win_rate"] is not None else None for w in ws]
        # No bar where nothing was measured (the base against itself): a drawn 0.5 would read as a result.
        ys = [w["win_rate"] if w else float("nan") for w in ws]
        err = [[w["win_rate"] - w["ci_low"] if w else 0.0 for w in ws], [w["ci_high"] - w["win_rate"] if w else 0.0 for w in ws]]
        ax1.bar([i + off for i in x], ys, 0.4, yerr=err, capsize=3, label=f"{kind} prompts")
    for i, m in enumerate(models):
        if m == "base":
            ax1.text(i, 0.52, "reference\n(not measured)", ha="center", fontsize=8, color="gray")
    ax1.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    ax1.set(xticks=list(x), xticklabels=models, ylim=(0, 1), ylabel="win rate vs base", xlabel="model",
            title="Pairwise win rate against the base")
    ax1.legend()
    for off, key, label in ((-0.2, "harmful", "harmful"), (0.2, "evasive_red_team", "evasive")):
        rs = [metrics["rates"].get(m, {}).get(key) for m in models]
        ys = [r["rate"] if r and r["rate"] is not None else 0.0 for r in rs]
        err = [[y - (r["ci_low"] if r else y) for y, r in zip(ys, rs)], [(r["ci_high"] if r else y) - y for y, r in zip(ys, rs)]]
        ax2.bar([i + off for i in x], ys, 0.4, yerr=err, capsize=3, label=label)
    ax2.set(xticks=list(x), xticklabels=models, ylim=(0, 1), ylabel="rate on held-out red-team prompts",
            xlabel="model", title="Harmful and evasive rates")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_oracle(metrics: dict, path: Path) -> None:
    """Ground-truth rates by stage: the lab's picture of what each stage did."""
    models = metrics["models"]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(ORACLE_COLUMNS)
    for j, (kind, fam, label) in enumerate(ORACLE_COLUMNS):
        ys = [metrics["oracle"]["rates"][m][kind]["all"].get(fam) for m in models]
        ax.bar([i + (j - (len(ORACLE_COLUMNS) - 1) / 2) * width for i in range(len(models))],
               [y if y is not None else 0.0 for y in ys], width, label=label + (" (benign prompts)" if kind == "helpful" else ""))
    ax.set(xticks=list(range(len(models))), xticklabels=models, ylim=(0, 1), xlabel="model",
           ylabel="share of held-out answers (oracle)", title="What each stage did, by ground truth")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_rl_curves(run_dir: Path, path: Path) -> bool:
    logs = {name: _read_log(rundir.stage_dir(run_dir, name) / "log.jsonl") for name in ("ppo", "rloo")}
    logs = {k: v for k, v in logs.items() if v}
    if not logs:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, rows in logs.items():
        steps = list(range(1, len(rows) + 1))
        axes[0].plot(steps, [r.get("reward_raw", r.get("reward")) for r in rows], marker="o", label=name)
        # One estimator and one unit for both: the mean over response tokens of log pi - log pi_ref (k1),
        # which TRL's RLOO logs as `kl` and our PPO as `kl_per_token` (its `kl` is the per-sequence sum).
        axes[1].plot(steps, [r.get("kl_per_token", r.get("kl")) if name == "ppo" else r.get("kl") for r in rows],
                     marker="o", label=name)
        axes[2].plot(steps, [r.get("entropy") for r in rows], marker="o", label=name)
    for ax, label in zip(axes, ("mean reward-model score", "KL to the SL-CAI reference per token (k1, nats)",
                                "policy entropy (nats)")):
        ax.set(xlabel="RL step", ylabel=label, title=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_judges(run_dir: Path, path: Path) -> bool:
    stage = rundir.stage_dir(run_dir, "label_preferences") / "stage.json"
    if not stage.is_file():
        return False
    per = json.loads(stage.read_text())["judges"]
    names = list(per)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = range(len(names))
    for off, key, label in ((-0.2, "position_consistency", "position consistency (choice survives the swap)"),
                            (0.2, "first_slot_preference", "raw preference for slot (A)")):
        values = [per[n][key] for n in names]
        ax.bar([i + off for i in x], [v or 0 for v in values], 0.4, label=label)
        for i, v in zip(x, values):
            if v is None:  # no decided comparisons: say so rather than draw a zero
                ax.text(i + off, 0.02, "n/a", ha="center")
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set(xticks=list(x), xticklabels=names, ylim=(0, 1), ylabel="share of comparisons", xlabel="judge",
           title="Judge position bias (label_preferences)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
