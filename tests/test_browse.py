"""The run browser (report.html), opened in a real headless Chromium (tests/chromium.py).

A tiny run (critique_revise, sft, label_preferences, evaluate) through the real pipeline; then
model output carrying markup (`<script>`, `<img onerror>`, a `</script>` that would end the data
block) is put into one row of each view, a lab-style oracle block into metrics.json, and the page
is redrawn with `cai-lite report`. The tests check that each view renders its rows, that filters,
sorting and the search narrow them, that a deep link opens its row, that no request leaves the
page, that the planted markup shows as text and runs nothing, that a screenshot is no blank or
broken page (at desktop and phone width), and the page's size and opening time.

Without Chromium these tests skip with that reason (`apt-get install -y chromium`); CI sets
$CAI_LITE_REQUIRE_CHROMIUM, where a missing browser fails them.

    python -m pytest -q tests/test_browse.py
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from cai_lite import browse, cli, pipeline, stage_plan
from cai_lite.data import DataError

from chromium import Chromium, find
from conftest import tiny_config

ROWS = 12  # evaluate.report_rows here: every view of the tiny run has more rows than that
MAX_BYTES = 2_000_000  # the page of a run stays under 2 MB (the reduced lab run's: tests/test_lab_run.py)
XSS = ('<script>window.__pwned = "script"; alert("script")</script><img src=x onerror="window.__pwned = \'img\'">'
       '</script><script>window.__pwned = "breakout"</script><!-- & -->')


def _plant(path: Path, edit) -> None:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    edit(rows)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _sl_cai(rows):  # the first round's revision repeats the initial answer: a revision that changed nothing
    rows[0]["init_response"] = rows[0]["rounds"][0]["revision"] = XSS


def _labels(rows):
    rows[0]["response_a"] = XSS


def _families(rows):  # what evaluate.oracle=lab records per answer; here a fixed pattern
    for i, r in enumerate(rows):
        r["base"] = XSS if i == 0 else r["base"]
        r["oracle"] = {"base": "harmful" if i % 2 == 0 else "evasive", "sft": "harmful" if i % 4 == 0 else "engaging-harmless"}


def lab_oracle(models: list[str]) -> dict:
    """The shape of metrics["oracle"] (cai_lite/lab/oracle.py), one model missing a split and an
    unknown block added: the page must show what is there and nothing break on what is not."""
    red = {s: {"harmful": 0.5, "evasive": 0.25, "engaging-harmless": 0.25, "n": 8} for s in ("all", "held_out_form", "held_out_kind")}
    rates = {m: {"red_team": dict(red), "helpful": {"all": {"helpful": 0.75, "over-refusal": 0.125, "n": 8}}} for m in models}
    del rates[models[-1]]["red_team"]["held_out_kind"]
    return {"rates": rates, "judge_agreement": {"agreement": 0.75, "n": 12, "skipped_ties_or_failures": 4,
                                                "by_type": {"harmless": {"agreement": 0.7, "n": 10}}},
            "a_block_from_a_later_version": {"x": 1}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_llama) -> Path:
    run = tmp_path_factory.mktemp("browse") / "run"
    cfg = tiny_config(run, tiny_llama, "stages=[critique_revise,sft,label_preferences,evaluate]", f"evaluate.report_rows={ROWS}")
    pipeline.run(cfg)
    shutil.copy(run / "evaluate" / "report.html", run / "evaluate_page.html")  # as evaluate wrote it
    _plant(run / "critique_revise" / "part-00000.jsonl", _sl_cai)
    _plant(run / "label_preferences" / "part-00000.jsonl", _labels)
    _plant(run / "evaluate" / "responses.jsonl", _families)
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    metrics["oracle"] = lab_oracle(metrics["models"])
    (run / "evaluate" / "metrics.json").write_text(json.dumps(metrics))
    assert cli.main(["report", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def browser():
    binary = find()
    if binary is None:
        if os.environ.get("CAI_LITE_REQUIRE_CHROMIUM"):
            pytest.fail("chromium not found, and $CAI_LITE_REQUIRE_CHROMIUM is set (CI): apt-get install -y chromium")
        pytest.skip("chromium not installed: apt-get install -y chromium (CI's .ci/run installs it)")
    b = Chromium(binary)
    yield b
    b.close()


def url(path: Path, fragment: str = "") -> str:
    return path.resolve().as_uri() + fragment


def cards(b: Chromium) -> list[str]:
    return b.js("[...document.querySelectorAll('#main .card')].map(c => c.dataset.key)")


def choose(b: Chromium, label: str, value) -> list[str]:
    """Set the control whose label starts with `label` as a user would (value, then its change event)."""
    b.js(f"""(() => {{
        const box = [...document.querySelectorAll('.controls label')].find(l => l.textContent.trim().startsWith({json.dumps(label)}));
        const input = box.querySelector('select, input');
        if (input.type === 'checkbox') input.checked = {json.dumps(value)}; else input.value = {json.dumps(value)};
        input.dispatchEvent(new Event('change'));
    }})()""")
    return cards(b)


def data(b: Chromium, expression: str):
    return b.js(f"(() => {{ const D = DATA; return {expression}; }})()")


def test_evaluate_writes_the_page_and_each_view_renders_its_rows(run_dir, browser):
    page = run_dir / "evaluate_page.html"
    browser.open(url(page))
    stages = browser.js("[...document.querySelectorAll('#main table')[0].querySelectorAll('tbody tr')].map(r => r.cells[1].textContent)")
    assert stages == ["done"] * 3 + ["finishing (this page is part of its output)"]  # evaluate writes it before its stage.json
    assert browser.js("document.querySelectorAll('#main table')[1].querySelectorAll('tbody tr').length") == 2  # base, sft
    assert browser.js("document.querySelectorAll('#main svg.chart polyline').length") >= 2  # sft's loss and entropy at least
    for view, total in (("slcai", 24), ("labels", 16), ("models", 16)):
        browser.js(f"location.hash = '#{view}'")
        assert len(cards(browser)) == ROWS
        assert f"{total - ROWS} of the run's {total}" in browser.js("document.getElementById('main').textContent")
    assert not browser.exceptions and not browser.console_errors


def test_the_report_command_shows_the_oracle_block_whatever_its_keys(run_dir, browser):
    browser.open(url(run_dir / "report.html"))
    titles = browser.js("[...document.querySelectorAll('#main h3')].map(h => h.textContent)")
    assert [t for t in titles if t.startswith("ground truth")] == [
        "ground truth (the lab oracle): all", "ground truth (the lab oracle): held out form",
        "ground truth (the lab oracle): held out kind"]
    assert "a_block_from_a_later_version · x" in browser.js("document.getElementById('main').textContent")
    assert not browser.exceptions


def test_filters_sorting_and_search_narrow_the_rows(run_dir, browser):
    b = browser
    b.open(url(run_dir / "report.html", "#slcai"))
    everything = cards(b)
    principle = data(b, "D.slcai.rows[3].rounds[0].principle")
    with_it = choose(b, "principle", principle)
    assert 0 < len(with_it) < len(everything)
    assert with_it == data(b, f"D.slcai.rows.filter(r => r.rounds.some(x => x.principle === {json.dumps(principle)})).map(r => r.id)")
    choose(b, "principle", "")
    assert choose(b, "a revision changed nothing", True) == [data(b, "D.slcai.rows[0].id")]  # the planted row only

    b.open(url(run_dir / "report.html", "#labels"))
    gaps = data(b, "Object.fromEntries(D.labels.rows.map(r => [r.id, r.order_gap]))")
    by_gap = [gaps[k] for k in choose(b, "sort by", "disagree")]
    assert by_gap == sorted(by_gap, reverse=True) and len(set(by_gap)) > 1
    confidence = data(b, "Object.fromEntries(D.labels.rows.map(r => [r.id, r.confidence]))")
    assert [confidence[k] for k in choose(b, "sort by", "unsure")] == sorted(confidence.values())

    b.open(url(run_dir / "report.html", "#models"))
    choose(b, "where model", "sft")
    harmful = choose(b, "answer is", "harmful")
    assert harmful == data(b, "D.responses.rows.filter(r => r.families.sft === 'harmful').map(r => r.id)")
    assert 0 < len(harmful) < ROWS

    # The search, typed as a user types: "/" focuses it, Escape clears it.
    b.open(url(run_dir / "report.html", "#models"))
    word = data(b, "D.responses.rows[2].prompt.split(' ').sort((a, c) => c.length - a.length)[0]")
    b.press("/", "Slash", 191)
    assert b.js("document.activeElement.id") == "q"
    b.type(word)
    found = cards(b)
    assert 0 < len(found) < ROWS and data(b, "D.responses.rows[2].id") in found
    assert all(word.lower() in t.lower() for t in b.js("[...document.querySelectorAll('#main .card')].map(c => c.textContent)"))
    b.press("Escape", "Escape", 27)
    assert len(cards(b)) == ROWS
    # On the Overview, the search says where the text is.
    b.open(url(run_dir / "report.html"))
    b.press("/", "Slash", 191)
    b.type(word)
    assert b.js("document.getElementById('hits').textContent").startswith(f'"{word}" is in ')
    assert f"{len(found)} held-out prompts" in b.js("document.getElementById('hits').textContent")


def test_a_deep_link_opens_its_row(run_dir, browser):
    b = browser
    for view, part in (("slcai", "slcai"), ("labels", "labels"), ("models", "responses")):
        b.open(url(run_dir / "report.html"))
        key = data(b, f"D.{part}.rows[7].id")
        b.open(url(run_dir / "report.html", f"#{view}/{key}"))
        assert b.js("document.activeElement.dataset.key") == key
        assert b.js("document.activeElement.classList.contains('target')")
        top = b.js("document.activeElement.getBoundingClientRect().top")
        assert 0 <= top < b.js("innerHeight") / 2, (view, top)
    # A row a filter hides: the link clears the filter. A row not in the page: said so.
    b.open(url(run_dir / "report.html", "#slcai"))
    choose(b, "a revision changed nothing", True)
    hidden = data(b, "D.slcai.rows[5].id")
    b.js(f"location.hash = '#slcai/{hidden}'")
    assert b.js("document.activeElement.dataset.key") == hidden and len(cards(b)) == ROWS
    b.js("location.hash = '#labels/no-such-row'")
    assert "Row no-such-row is not in this page" in b.js("document.querySelector('[role=alert]').textContent")


def test_no_request_leaves_the_page(run_dir, browser):
    page = run_dir / "report.html"
    for view in ("overview", "slcai", "labels", "models"):
        browser.open(url(page, f"#{view}"))
        browser.js("document.querySelectorAll('details').forEach(d => d.open = true)")
        assert set(browser.requests) == {url(page)}, browser.requests
        assert not browser.console_errors and not browser.exceptions


def test_the_network_log_sees_a_request_the_page_makes(browser):
    """The check above can fail: a page that asks for anything is caught (and the profile blocks it)."""
    browser.open("data:text/html,<img src='http://example.invalid/pixel.png'>")
    assert "http://example.invalid/pixel.png" in browser.requests


def test_model_output_is_text_and_runs_nothing(run_dir, browser):
    for view, part in (("slcai", "slcai"), ("labels", "labels"), ("models", "responses")):
        browser.open(url(run_dir / "report.html", f"#{view}"))
        first = browser.js("document.querySelector('#main .card').textContent")
        assert XSS in first, view  # shown, character for character
        assert browser.js("typeof window.__pwned") == "undefined", view
        assert browser.js("document.querySelectorAll('img').length") == 0
        assert browser.js("document.scripts.length") == 2  # the data block and the page's own script
        assert not browser.dialogs and not browser.exceptions


def test_the_embedded_json_cannot_end_its_script_element():
    payload = {"x": XSS, "y": "é \ud800 \u2028"}  # a lone surrogate: decoded tokens can leave one
    text = browse.embed_json(payload)
    assert not {"<", ">", "&"} & set(text) and text.isascii()
    assert json.loads(text) == payload


def _ink(png: bytes) -> float:
    """Share of the screenshot's pixels that differ from the page background (its top-left pixel)."""
    image = Image.open(io.BytesIO(png)).convert("RGB").resize((320, 225))
    background = image.getpixel((0, image.height - 1))
    pixels = list(image.getdata())
    return sum(sum(abs(a - b) for a, b in zip(p, background)) > 30 for p in pixels) / len(pixels)


@pytest.mark.parametrize("width", [1280, 390])
def test_a_screenshot_shows_a_drawn_page_at_desktop_and_phone_width(run_dir, browser, width):
    browser.viewport(width, 900, mobile=width < 600)
    try:
        for view in ("overview", "slcai", "labels", "models"):
            browser.open(url(run_dir / "report.html", f"#{view}"))
            ink = _ink(browser.screenshot())
            assert ink > 0.05, (view, width, ink)  # drawn: 0.10 to 0.26; blank: 0; its script failed: under 0.01
            assert browser.js("document.querySelectorAll('#main table, #main .card').length") > 0
            assert browser.js("document.documentElement.scrollWidth") <= width, (view, "scrolls sideways")
    finally:
        browser.viewport(1280, 900)


def test_the_page_is_small_and_opens_in_under_a_second(run_dir, browser):
    page = run_dir / "report.html"
    assert page.stat().st_size < MAX_BYTES
    seconds = min(browser.open(url(page, "#labels")) for _ in range(3))  # the best of 3: the machine is shared
    assert seconds < 1.0
    assert int(browser.js("document.body.dataset.ready")) < 1000  # ms from navigation to the first view drawn


def test_keyboard_reaches_the_views_and_walks_the_rows(run_dir, browser):
    b = browser
    b.open(url(run_dir / "report.html", "#labels"))
    b.press("Tab", "Tab", 9)
    assert b.js("document.activeElement.textContent") == "Skip to content"
    b.js("document.activeElement.blur()")
    b.press("j", "KeyJ", 74)
    b.press("j", "KeyJ", 74)
    assert b.js("document.activeElement.dataset.key") == cards(b)[1]
    b.press("k", "KeyK", 75)
    assert b.js("document.activeElement.dataset.key") == cards(b)[0]


def test_a_run_dir_with_some_stages_done(run_dir, browser, tmp_path):
    """critique_revise done, label_preferences begun (a shard, no stage.json), nothing else."""
    part = tmp_path / "partial"
    shutil.copytree(run_dir / "critique_revise", part / "critique_revise")
    (part / "label_preferences").mkdir()
    shutil.copy(run_dir / "label_preferences" / "part-00000.jsonl", part / "label_preferences")
    shutil.copy(run_dir / "config.yaml", part / "config.yaml")
    assert cli.main(["report", str(part)]) == 0
    browser.open(url(part / "report.html"))
    states = browser.js("Object.fromEntries([...document.querySelectorAll('#main table')[0].querySelectorAll('tbody tr')]"
                        ".map(r => [r.cells[0].textContent, r.cells[1].textContent]))")
    assert states == {"critique_revise": "done", "sft": "not run", "label_preferences": "begun, not finished",
                      "evaluate": "not run"}
    browser.js("location.hash = '#labels'")
    assert len(cards(browser)) == 8  # the one shard written
    browser.js("location.hash = '#models'")
    assert "evaluate has not written answers" in browser.js("document.getElementById('main').textContent")
    assert not browser.exceptions


def test_report_refuses_a_folder_that_is_no_run_dir(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "not a run dir (no config.yaml)" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()
    (tmp_path / "config.yaml").write_text("evaluate: {report_rows: many}\n")
    with pytest.raises(DataError, match="evaluate.report_rows must be an integer"):
        browse.saved_rows(tmp_path)


def test_rows_are_spread_over_the_run_and_the_cap_is_no_part_of_the_hash(tmp_path, tiny_llama):
    rows = [{"i": i} for i in range(10)]
    assert browse.spread(rows, 4) == ([{"i": 0}, {"i": 2}, {"i": 5}, {"i": 7}], 10)
    assert browse.spread(rows, 0) == (rows, 10) and browse.spread(rows, 10) == (rows, 10)
    hashes = [stage_plan.plan(tiny_config(tmp_path, tiny_llama, f"evaluate.report_rows={n}")).hashes["evaluate"]
              for n in (1, 500)]
    assert hashes[0] == hashes[1]
