"""The run browser: one self-contained `report.html` per run, to read what Constitutional AI did.

Reads whatever a run dir holds (stages may be missing or unfinished): `config.yaml`, each stage's
`stage.json`, the training logs (`sft/train_log.jsonl`, `<stage>/log.jsonl`: the scalars each
training stage also writes to TensorBoard), the critique_revise and label_preferences shards (and
their `failed-*` rows), and evaluate's `metrics.json`, `responses.jsonl` and `verdicts.jsonl`.
Writes one HTML file with the CSS, the script (`browse_page.html`, `browse_page.js`, shipped with
the package) and the data inline: it opens from disk, and asks no server and no network for anything.

Model output is untrusted text. The data goes in as JSON with `<`, `>` and `&` escaped, so no text
can close the script element that carries it, and the page builds its DOM with `textContent` only.
Each view embeds at most `evaluate.report_rows` rows, spread evenly over the run's rows, and says
how many it left out. Evaluate writes `evaluate/report.html`; for any run dir:

    cai-lite report runs/tiny_cpu            # writes runs/tiny_cpu/report.html
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

import yaml

from cai_lite import constitution as C
from cai_lite import data, report, rundir, voting
from cai_lite.config import STAGES
from cai_lite.stage_config import EvaluateConfig

log = logging.getLogger(__name__)
MAX_CHARS = 6000  # per text: a runaway generation must not make the page unreadable (the run dir has it all)
MAX_POINTS = 150  # per training curve; longer logs are thinned evenly
# Drawn first; every other scalar a stage logged is folded under "more curves".
MAIN_CURVES = ("loss", "reward", "reward_raw", "kl", "kl_per_token", "entropy", "rewards/margins",
               "rewards/accuracies", "accuracy", "eval_accuracy", "value_loss")
LOGS = ("log.jsonl", "train_log.jsonl")
DATA_MARK, SCRIPT_MARK = "/*CAI_LITE_DATA*/", "/*CAI_LITE_SCRIPT*/"


def write(run_dir: Path, out: Path, max_rows: int, writer: str | None = None) -> Path:
    """Write the browser page of `run_dir` to `out` (atomically); return `out`. `writer`: the stage
    writing it as part of its outputs, so before its own stage.json."""
    page = render(collect(run_dir, max_rows, writer))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    log.info("run browser: %s (%.0f kB)", out, len(page.encode()) / 1024)
    return out


def saved_rows(run_dir: Path) -> int:
    """The row cap of a run dir's config.yaml (`evaluate.report_rows`); today's default for a run
    made before the key existed. DataError when `run_dir` is not a run dir."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise data.DataError(f"{run_dir}: not a run dir (no config.yaml); give the folder a run wrote, e.g. runs/tiny_cpu")
    rows = (_config(run_dir)[1].get("evaluate") or {}).get("report_rows", EvaluateConfig().report_rows)
    if not isinstance(rows, int) or rows < 0:
        raise data.DataError(f"{path}: evaluate.report_rows must be an integer >= 0 (got {rows!r})")
    return rows


def _config(run_dir: Path) -> tuple[str, dict]:
    """config.yaml as text and as data; empty where there is none."""
    path = run_dir / "config.yaml"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    try:
        saved = yaml.safe_load(text) if text else {}
    except yaml.YAMLError as e:
        raise data.DataError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(saved, dict):
        raise data.DataError(f"{path}: expected a mapping of config sections")
    return text, saved


def render(payload: dict) -> str:
    """The page: template + script + the data as JSON that no text inside it can break out of."""
    package = resources.files("cai_lite")
    html = package.joinpath("browse_page.html").read_text(encoding="utf-8")
    script = package.joinpath("browse_page.js").read_text(encoding="utf-8")
    return html.replace(SCRIPT_MARK, script, 1).replace(DATA_MARK, embed_json(payload), 1)


def embed_json(payload) -> str:
    """JSON safe inside <script type="application/json">: `</script>`, `<!--` and `]]>` cannot
    appear, because no `<`, `>` or `&` does (each becomes a JSON escape that parses back to itself).
    ASCII only, so a lone surrogate in a model's output cannot stop the page being written."""
    text = json.dumps(payload, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def collect(run_dir: Path, max_rows: int, writer: str | None = None) -> dict:
    """Everything the page shows, as plain JSON data."""
    config_text, config = _config(run_dir)
    metrics_path = rundir.stage_dir(run_dir, "evaluate") / "metrics.json"
    metrics = _read_json(metrics_path) if metrics_path.is_file() else None
    const = config.get("constitution")
    sl_rows, sl_total = spread(sl_cai_rows(run_dir), max_rows)
    label_rows, label_total = spread(label_rows_of(run_dir), max_rows)
    model_rows, model_total = spread(model_rows_of(run_dir, metrics), max_rows)
    return {
        "run": run_dir.resolve().name,
        "max_rows": max_rows,
        "config": config_text[:MAX_CHARS * 4],
        "stages": stage_table(run_dir, config.get("stages") or [], writer),
        "headline": report.table_rows(metrics) if metrics else None,
        "tables": metric_tables(metrics) if metrics else [],
        "models": (metrics or {}).get("models") or sorted({m for r in model_rows for m in r["answers"]}),
        "curves": curves(run_dir),
        "principles": principle_texts(const) if const else {},
        "slcai": {"rows": sl_rows, "total": sl_total},
        "labels": {"rows": label_rows, "total": label_total},
        "responses": {"rows": model_rows, "total": model_total},
    }


def spread(rows: list[dict], cap: int) -> tuple[list[dict], int]:
    """At most `cap` rows, evenly spaced over all of them (so every shard and prompt type shows)."""
    n = len(rows)
    if cap <= 0 or n <= cap:
        return rows, n
    return [rows[i * n // cap] for i in range(cap)], n


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise data.DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def _clip(text) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= MAX_CHARS else f"{text[:MAX_CHARS]}\n[... {len(text) - MAX_CHARS} more characters in the run dir]"


def _user_text(prompt) -> str:
    """The user turn of a row's `prompt` (TRL's conversational format), or the text itself."""
    if isinstance(prompt, list):
        return next((m.get("content", "") for m in reversed(prompt) if m.get("role") == "user"), "")
    return prompt or ""


def stage_table(run_dir: Path, selected: list[str], writer: str | None = None) -> list[dict]:
    """Each stage: done (its stage.json), begun (a folder, no stage.json yet), or not run; with its
    time, peak memory and the scalar metrics its stage.json records. `writer` is finishing."""
    out = []
    for name in STAGES:
        folder = rundir.stage_dir(run_dir, name)
        done = rundir.is_done(run_dir, name)
        info = _read_json(folder / "stage.json") if done else {}
        scalars = {k: v for k, v in info.items() if isinstance(v, (int, float, bool)) or isinstance(v, str) and len(v) <= 60}
        scalars = {k: v for k, v in scalars.items() if k not in ("stage", "config_hash", "seconds", "peak_memory_mb",
                                                                  "output_id", "peak_memory_scope", "processes")}
        state = ("done" if done else "finishing (this page is part of its output)" if name == writer
                 else "begun, not finished" if folder.is_dir() else "not run")
        if state == "not run" and name not in selected:
            continue
        out.append({"stage": name, "state": state, "seconds": info.get("seconds"),
                    "peak_memory_mb": info.get("peak_memory_mb"), "metrics": scalars})
    return out


def metric_tables(metrics: dict) -> list[dict]:
    """Tables built from whatever evaluate measured beyond the headline: the lab oracle's rates
    (one table per split), and every other nested block flattened. Extra or missing keys only add or
    drop rows and columns."""
    tables = []
    oracle = metrics.get("oracle") or {}
    rates = oracle.get("rates") or {}
    by_split: dict[str, dict[str, dict]] = {}
    for model, per in rates.items():
        for path, value in _flatten(per):
            # Rates are nested kind -> split -> family; the split is the second level where there are 3.
            split = path[1] if len(path) >= 3 else "all"
            column = " · ".join(p for i, p in enumerate(path) if not (len(path) >= 3 and i == 1))
            by_split.setdefault(split, {}).setdefault(model, {})[column] = value
    for split, per_model in by_split.items():
        columns = list(dict.fromkeys(c for cols in per_model.values() for c in cols))
        tables.append({"title": f"ground truth (the lab oracle): {split.replace('_', ' ')}",
                       "header": ["model", *columns],
                       "rows": [[m, *[per_model[m].get(c) for c in columns]] for m in per_model]})
    rest = [("oracle", {k: v for k, v in oracle.items() if k != "rates"})] if oracle else []
    rest += [(k, metrics[k]) for k in ("prompts", "paper_evals", "mean_reward", "elo") if metrics.get(k)]
    for title, block in rest:
        pairs = _flatten(block)
        if pairs:
            tables.append({"title": title.replace("_", " "), "header": ["measure", "value"],
                           "rows": [[" · ".join(p), v] for p, v in pairs]})
    return tables


def _flatten(block, path: tuple = ()) -> list[tuple[tuple, object]]:
    if isinstance(block, dict):
        return [pv for k, v in block.items() for pv in _flatten(v, (*path, str(k)))]
    if isinstance(block, (int, float, str, bool)) or block is None:
        return [(path, block)] if path else []
    return []  # lists (intervals, per-item scores) do not fit one table cell


def curves(run_dir: Path) -> list[dict]:
    """Every numeric scalar each training stage logged per step, thinned to MAX_POINTS."""
    out = []
    for name in STAGES:
        for log_name in LOGS:
            path = rundir.stage_dir(run_dir, name) / log_name
            if not path.is_file():
                continue
            series: dict[str, list] = {}
            for i, row in enumerate(_log_rows(path)):
                step = row.get("step", i + 1)
                for key, value in row.items():
                    if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
                        series.setdefault(key, []).append([step, float(f"{value:.5g}")])
            for key, points in series.items():
                if len(points) >= 2:
                    points = spread(points, MAX_POINTS)[0]
                    out.append({"stage": name, "name": key, "main": key in MAIN_CURVES,
                                "x": [p[0] for p in points], "y": [p[1] for p in points]})
    return out


def _log_rows(path: Path) -> list[dict]:
    """A log's rows; a line cut short by a killed run is left out (logs are shown, never trusted)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("run browser: %s: an unreadable line left out", path)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def principle_texts(spec: str) -> dict[str, str]:
    """Principle id -> its critique request or preference question, when the constitution still loads."""
    try:
        const = C.load(spec)
    except C.ConstitutionError as e:
        log.warning("run browser: principles shown by id only (%s)", e)
        return {}
    return {**{p.id: p.critique for p in const.critique_revision}, **{p.id: p.text for p in const.preference}}


def sl_cai_rows(run_dir: Path) -> list[dict]:
    """One card per SL-CAI prompt: the initial answer, each round's principle, critique and revision
    (marked where it changed nothing), and which text became the SFT target."""
    folder = rundir.stage_dir(run_dir, "critique_revise")
    out = []
    for row, failed in [(r, False) for r in data.read_shards(folder)] + [(r, True) for r in data.read_failed(folder)]:
        latest, target_round, rounds = row.get("init_response", ""), None, []
        for i, r in enumerate(row.get("rounds") or []):
            revision = r.get("revision", "")
            rounds.append({"principle": r.get("principle_id"), "critique": _clip(r.get("critique")),
                           "revision": _clip(revision), "empty": not revision,
                           "unchanged": bool(revision) and revision.strip() == latest.strip()})
            if revision:  # an empty revision is no target; the next round revises the latest valid answer
                latest, target_round = revision, i
        target = None if failed else row.get("revision_response") or None
        out.append({"id": str(row.get("id")), "type": row.get("type", "harmless"),
                    "prompt": _clip(row.get("init_prompt") or _user_text(row.get("prompt"))),
                    "initial": _clip(row.get("init_response")), "rounds": rounds, "target": _clip(target) if target else None,
                    "target_round": target_round if target and rounds else None,
                    "unchanged": any(r["unchanged"] for r in rounds), "failed": failed})
    return out


def label_rows_of(run_dir: Path) -> list[dict]:
    """One row per judged pair: both answers, the soft label, and per judge and principle P(A better)
    with A shown first and with B shown first, and how far the two orders are apart."""
    folder = rundir.stage_dir(run_dir, "label_preferences")
    out = []
    for row in data.read_shards(folder) + data.read_failed(folder):
        judges, gaps, consistent = [], [], []
        for name, j in (row.get("judges") or {}).items():
            cells = []
            for d in j.get("principles") or []:
                first, swapped = d.get("p_ab"), d.get("p_ba")
                second = None if swapped is None else 1.0 - swapped  # P(A better) when A sat in slot (B)
                if first is not None and second is not None:
                    gaps.append(abs(first - second))
                consistent.append(voting.position_consistent(first, swapped))
                cells.append({"id": d.get("id"), "a_first": first, "a_second": second, "p_a": d.get("p_a"),
                              **{k: _clip(d[k]) for k in ("cot_ab", "cot_ba") if d.get(k)}})
            judges.append({"name": name, "p_a": j.get("p_a"), "principles": cells})
        p_a = row.get("p_a")
        out.append({"id": str(row.get("id")), "type": row.get("type", "harmless"), "prompt": _clip(_user_text(row.get("prompt"))),
                    "a": _clip(row.get("response_a")), "b": _clip(row.get("response_b")), "p_a": p_a,
                    "confidence": None if p_a is None else abs(p_a - 0.5), "judges": judges,
                    "order_gap": sum(gaps) / len(gaps) if gaps else None,
                    "orders_agree": voting.rate(consistent)})
    return out


def model_rows_of(run_dir: Path, metrics: dict | None) -> list[dict]:
    """Evaluate's held-out prompts: every model's answer, the judge's P(model better) against the
    base and sft (`verdicts.jsonl`), and the oracle's family per answer where evaluate recorded one
    (a row's `oracle: {model: family}`)."""
    folder = rundir.stage_dir(run_dir, "evaluate")
    path = folder / "responses.jsonl"
    if not path.is_file():
        return []
    rows = _jsonl(path)
    models = (metrics or {}).get("models") or list(dict.fromkeys(
        k for r in rows for k in r if k not in ("id", "kind", "prompt", "oracle")))
    verdicts: dict[tuple, dict] = {}
    if (folder / "verdicts.jsonl").is_file():
        for v in _jsonl(folder / "verdicts.jsonl"):
            per_model = verdicts.setdefault((v.get("kind"), str(v.get("id"))), {}).setdefault(v.get("model"), {})
            per_model[f"vs {v.get('vs')}"] = v.get("p_model_better")
    out = []
    for row in rows:
        kind = row.get("kind", "red_team")
        families = row.get("oracle") if isinstance(row.get("oracle"), dict) else {}
        out.append({"id": str(row.get("id")), "kind": kind, "prompt": _clip(row.get("prompt")),
                    "answers": {m: _clip(row.get(m)) for m in models if m in row},
                    "verdicts": verdicts.get((kind, str(row.get("id"))), {}),
                    "families": {m: str(f) for m, f in families.items()}})
    return out


def _jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise data.DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows
