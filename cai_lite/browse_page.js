// The run browser's script (cai_lite/browse.py inlines it into report.html). Reads the JSON in
// <script id="data">, draws four views (Overview, SL-CAI, Labels, Models) from the URL's fragment
// (#view or #view/ROW-ID, so a link can point at one row), filters them and searches them.
// Every string from the run is model output or derived from it: it reaches the page only through
// text nodes (el() below). Nothing here parses a string as HTML.
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const VIEWS = [["overview", "Overview"], ["slcai", "SL-CAI"], ["labels", "Labels"], ["models", "Models"]];
const FOLD = 360;  // characters; longer texts start folded
const FILTERS = {  // each view's controls as the page opens
  slcai: {principle: "", type: "", unchanged: false},
  labels: {sort: "file", type: "", disagree: false},
  models: {kind: "", model: "", family: ""},
};
const state = {view: "overview", q: "", ...structuredClone(FILTERS)};
let list = null, count = null;  // the current view's row container and its "n shown" line

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c !== null && c !== undefined && c !== false) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

const fmt = (x, d = 2) => x === null || x === undefined ? "–" : typeof x === "number" ?
  (Number.isInteger(x) ? String(x) : x.toFixed(d)) : String(x);
const link = (view, id) => "#" + view + "/" + encodeURIComponent(id);
const badge = (text, kind) => el("span", {class: "badge" + (kind ? " " + kind : "")}, text);

function textBlock(label, s, extra) {
  s = s === null || s === undefined ? "" : String(s);
  const cls = "text" + (extra ? " " + extra : "");
  const lbl = label ? el("span", {class: "lbl"}, label) : null;
  if (s.length <= FOLD) return el("div", {class: cls}, lbl, el("p", {class: "body"}, s === "" ? "(empty)" : s));
  return el("details", {class: cls},
    el("summary", {}, lbl, el("span", {class: "preview"}, s.slice(0, 200) + "…"), el("span", {class: "note"}, ` (${s.length} characters)`)),
    el("p", {class: "body"}, s));
}

function table(header, rows) {
  return el("div", {class: "tablewrap"}, el("table", {},
    el("thead", {}, el("tr", {}, header.map(h => el("th", {scope: "col"}, h)))),
    el("tbody", {}, rows.map(r => el("tr", {}, r.map((c, i) =>
      i === 0 ? el("th", {scope: "row"}, fmt(c)) :
        el("td", {class: typeof c === "number" ? "num" : ""}, c instanceof Node ? c : fmt(c))))))));
}

function select(label, value, options, onchange) {
  return el("label", {}, label + " ", el("select", {onchange: e => onchange(e.target.value)},
    options.map(([v, t]) => el("option", {value: v, selected: v === value}, t))));
}

function checkbox(label, checked, onchange) {
  return el("label", {}, el("input", {type: "checkbox", checked, onchange: e => onchange(e.target.checked)}), " " + label);
}

function matches(...texts) {
  if (!state.q) return true;
  const q = state.q.toLowerCase();
  return texts.flat(Infinity).some(t => t !== null && t !== undefined && String(t).toLowerCase().includes(q));
}

function card(view, row, headerBits, ...body) {
  return el("article", {class: "card", tabindex: 0, "data-key": row.id, "aria-label": `${view} row ${row.id}`},
    el("header", {}, el("a", {class: "permalink", href: link(view, row.id), title: "Link to this row"}, "#" + row.id),
      headerBits), body);
}

function leftOut(part, what) {
  const shown = part.rows.length, left = part.total - shown;
  return left > 0 ? `${left} of the run's ${part.total} ${what} are left out of this page (evaluate.report_rows = ${DATA.max_rows}); the run dir has them all.` : "";
}

// ---- Overview ------------------------------------------------------------------------------------
const tick = y => y === 0 ? "0" : Math.abs(y) >= 1e4 || Math.abs(y) < 1e-3 ? y.toExponential(2) : String(+y.toPrecision(4));

function chart(c) {
  const W = 300, H = 150, L = 46, R = 10, T = 20, B = 24;
  const xs = c.x, ys = c.y;
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { const pad = Math.abs(y0) * 0.1 || 0.5; y0 -= pad; y1 += pad; }
  const px = x => L + (x - x0) / (x1 - x0) * (W - L - R), py = y => T + (y1 - y) / (y1 - y0) * (H - T - B);
  const s = svg("svg", {viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
    "aria-label": `${c.stage}: ${c.name} over ${xs.length} logged steps, first ${tick(ys[0])}, last ${tick(ys[ys.length - 1])}`});
  s.append(svg("title", {}, `${c.stage} ${c.name}`), svg("text", {x: 6, y: 13, class: "title"}, `${c.stage} · ${c.name}`),
    svg("line", {x1: L, y1: H - B, x2: W - R, y2: H - B}), svg("line", {x1: L, y1: T, x2: L, y2: H - B}),
    svg("text", {x: L - 4, y: T + 4, "text-anchor": "end"}, tick(y1)), svg("text", {x: L - 4, y: H - B, "text-anchor": "end"}, tick(y0)),
    svg("text", {x: L, y: H - 8}, fmt(x0, 0)), svg("text", {x: W - R, y: H - 8, "text-anchor": "end"}, "step " + fmt(x1, 0)),
    svg("polyline", {points: xs.map((x, i) => `${px(x).toFixed(1)},${py(ys[i]).toFixed(1)}`).join(" ")}));
  return s;
}

function recorded(metrics) {  // a stage.json's scalars, folded: the first few in view
  const items = Object.entries(metrics).map(([k, v]) => `${k} = ${fmt(v, 3)}`);
  if (items.length <= 2) return items.join(", ");
  return el("details", {}, el("summary", {}, items.slice(0, 2).join(", ") + ` … (${items.length})`),
    el("ul", {}, items.map(t => el("li", {}, t))));
}

function hits() {  // on the Overview, the search says how many rows of each view hold the text
  const box = document.getElementById("hits");
  if (!box) return;  // a view with no rows at all
  box.replaceChildren(el("span", {}, state.q ? [`"${state.q}" is in `, Object.entries(LISTS).map(([id, v], i) =>
    [i ? ", " : "", el("a", {href: "#" + id}, `${v.rows().length} ${v.what}`)]), "."] : null));
}

function overview(main) {
  main.append(el("p", {id: "hits", role: "status", "aria-live": "polite"}));
  hits();
  main.append(el("h2", {}, "Stages"), table(["stage", "state", "seconds", "peak memory (MB)", "recorded"],
    DATA.stages.map(s => [s.stage, s.state, s.seconds === null ? null : Math.round(s.seconds * 10) / 10,
      s.peak_memory_mb === null ? null : Math.round(s.peak_memory_mb),
      recorded(s.metrics)])));
  if (DATA.headline) main.append(el("h2", {}, "Results (evaluate)"), table(DATA.headline[0], DATA.headline.slice(1)),
    el("p", {class: "note"}, "Win rates: P(model beats the base) from the judges, both option orders, 95% bootstrap intervals; rates: judge classifications."));
  else main.append(el("p", {class: "note"}, "evaluate has not run in this run dir: no results yet."));
  for (const t of DATA.tables) main.append(el("h3", {}, t.title), table(t.header, t.rows));
  main.append(el("h2", {}, "Training curves"));
  if (!DATA.curves.length) main.append(el("p", {class: "note"}, "No training stage has logged a step yet."));
  for (const stage of [...new Set(DATA.curves.map(c => c.stage))]) {
    const mine = DATA.curves.filter(c => c.stage === stage), more = mine.filter(c => !c.main);
    main.append(el("section", {}, el("h3", {}, stage), el("div", {class: "curves"}, mine.filter(c => c.main).map(chart)),
      more.length ? el("details", {}, el("summary", {}, `${more.length} more curves from ${stage}`),
        el("div", {class: "curves"}, more.map(chart))) : null));
  }
  main.append(el("h2", {}, "Keyboard"), el("p", {class: "note"}, el("kbd", {}, "/"), " search, ", el("kbd", {}, "j"), " / ",
    el("kbd", {}, "k"), " next / previous row, ", el("kbd", {}, "Esc"), " clears the search."));
  if (DATA.config) main.append(el("details", {}, el("summary", {}, "config.yaml (the resolved config)"), el("pre", {}, DATA.config)));
}

// ---- SL-CAI --------------------------------------------------------------------------------------
function slcaiControls() {
  const ids = [...new Set(DATA.slcai.rows.flatMap(r => r.rounds.map(x => x.principle)))].filter(Boolean).sort();
  const f = state.slcai;
  return [select("principle", f.principle, [["", "any"], ...ids.map(i => [i, i])], v => { f.principle = v; update(); }),
    select("prompts", f.type, [["", "all"], ["harmless", "red-team (revised)"], ["helpful", "helpful (kept as answered)"]], v => { f.type = v; update(); }),
    checkbox("a revision changed nothing", f.unchanged, v => { f.unchanged = v; update(); })];
}

function slcaiRows() {
  const f = state.slcai;
  return DATA.slcai.rows.filter(r => (!f.principle || r.rounds.some(x => x.principle === f.principle)) &&
    (!f.type || r.type === f.type) && (!f.unchanged || r.unchanged) &&
    matches(r.prompt, r.initial, r.rounds.map(x => [x.critique, x.revision])));
}

function slcaiCard(r) {
  const helpfulTarget = r.type === "helpful" && r.target !== null;
  const bits = [badge(r.type), r.failed || r.target === null ? badge("no SFT target", "bad") : null,
    r.unchanged ? badge("a revision changed nothing", "warn") : null];
  const rounds = el("ol", {class: "rounds"}, r.rounds.map((x, i) => el("li", {},
    el("div", {class: "principle"}, `round ${i + 1} · principle ${x.principle}`,
      DATA.principles[x.principle] ? ": " + DATA.principles[x.principle] : "",
      x.unchanged ? [" ", badge("unchanged", "warn")] : null, x.empty ? [" ", badge("empty revision: not a target", "bad")] : null),
    textBlock("critique", x.critique), textBlock(i === r.target_round ? "revision → SFT target" : "revision", x.revision,
      i === r.target_round ? "target-text" : null))));
  const target = r.target === null ? "No SFT target: no round gave a valid revision (the row is in failed-*.jsonl)." :
    helpfulTarget ? "SFT target: the answer itself (a helpful prompt, kept as answered)." :
    `SFT target: the revision of round ${r.target_round + 1}.`;
  return card("slcai", r, bits, textBlock("prompt", r.prompt),
    textBlock(helpfulTarget ? "answer → SFT target" : "initial answer", r.initial, helpfulTarget ? "target-text" : null),
    r.rounds.length ? rounds : null, el("p", {class: "note"}, target));
}

// ---- Labels --------------------------------------------------------------------------------------
function labelControls() {
  const f = state.labels;
  return [select("sort by", f.sort, [["file", "file order"], ["confident", "most confident first"],
    ["unsure", "least confident first"], ["disagree", "orders disagree most first"]], v => { f.sort = v; update(); }),
  select("prompts", f.type, [["", "all"], ["harmless", "red-team"], ["helpful", "helpful"]], v => { f.type = v; update(); }),
  checkbox("the two orders disagree", f.disagree, v => { f.disagree = v; update(); })];
}

function labelRows() {
  const f = state.labels, num = x => x === null || x === undefined ? -1 : x;
  const rows = DATA.labels.rows.filter(r => (!f.type || r.type === f.type) &&
    (!f.disagree || (r.orders_agree !== null && r.orders_agree < 1)) && matches(r.prompt, r.a, r.b));
  const key = {confident: r => -num(r.confidence), unsure: r => r.confidence === null ? 9 : r.confidence,
    disagree: r => -num(r.order_gap)}[f.sort];
  return key ? rows.map((r, i) => [key(r), i, r]).sort((x, y) => x[0] - y[0] || x[1] - y[1]).map(x => x[2]) : rows;
}

function labelCard(r) {
  const chosen = r.p_a === null ? null : r.p_a >= 0.5 ? "a" : "b";
  const bits = [badge(r.type), r.p_a === null ? badge("no label: every judge failed", "bad") :
    badge(`soft label P(A better) = ${fmt(r.p_a, 3)}`), badge(`confidence ${fmt(r.confidence, 3)}`),
  badge(`orders apart by ${fmt(r.order_gap, 3)}`, r.orders_agree !== null && r.orders_agree < 1 ? "warn" : null),
  badge(`orders agree on ${r.orders_agree === null ? "–" : Math.round(100 * r.orders_agree) + "%"} of principles`)];
  const judges = r.judges.map(j => [el("h3", {}, `judge ${j.name}: P(A better) = ${fmt(j.p_a, 3)}`),
    table(["principle", "question", "P(A) with A shown first", "P(A) with B shown first", "mean"],
      j.principles.map(p => [p.id, DATA.principles[p.id] || "", p.a_first, p.a_second, p.p_a])),
    j.principles.filter(p => p.cot_ab || p.cot_ba).map(p => [textBlock(`${p.id}: reasoning, A first`, p.cot_ab),
      textBlock(`${p.id}: reasoning, B first`, p.cot_ba)])]);
  return card("labels", r, bits, textBlock("prompt", r.prompt), el("div", {class: "side"},
    el("div", {class: chosen === "a" ? "chosen" : ""}, textBlock("answer A" + (chosen === "a" ? " (chosen)" : ""), r.a)),
    el("div", {class: chosen === "b" ? "chosen" : ""}, textBlock("answer B" + (chosen === "b" ? " (chosen)" : ""), r.b))),
  el("details", {}, el("summary", {}, "per judge and principle"), judges));
}

// ---- Models --------------------------------------------------------------------------------------
function modelControls() {
  const f = state.models, fams = [...new Set(DATA.responses.rows.flatMap(r => Object.values(r.families)))].sort();
  const out = [select("prompts", f.kind, [["", "all"], ["red_team", "red-team"], ["helpful", "helpful"]], v => { f.kind = v; update(); })];
  if (!fams.length) return [...out, el("span", {class: "note"}, "No oracle families in this run (the lab's evaluate.oracle=lab records them).")];
  return [...out, select("where model", f.model, [["", "any model"], ...DATA.models.map(m => [m, m])], v => { f.model = v; update(); }),
    select("answer is", f.family, [["", "any family"], ...fams.map(x => [x, x])], v => { f.family = v; update(); })];
}

function modelRows() {
  const f = state.models;
  return DATA.responses.rows.filter(r => (!f.kind || r.kind === f.kind) &&
    (!f.family || (f.model ? r.families[f.model] === f.family : Object.values(r.families).includes(f.family))) &&
    matches(r.prompt, Object.values(r.answers)));
}

function modelCard(r) {
  return card("models", r, [badge(r.kind === "red_team" ? "red-team" : r.kind)], textBlock("prompt", r.prompt),
    el("div", {class: "side"}, DATA.models.filter(m => m in r.answers).map(m => el("div", {"data-model": m},
      el("h3", {}, m, " ", r.families[m] ? badge(r.families[m], /harm/.test(r.families[m]) ? "bad" : null) : null),
      Object.entries(r.verdicts[m] || {}).map(([vs, p]) => el("div", {class: "note"},
        `judge: P(${m} better ${vs}) = ${fmt(p, 3)}`)), textBlock("", r.answers[m])))));
}

// ---- the page ------------------------------------------------------------------------------------
const LISTS = {
  slcai: {title: "SL-CAI: critique and revision", part: () => DATA.slcai, what: "SL-CAI rows", controls: slcaiControls, rows: slcaiRows, card: slcaiCard,
    empty: "critique_revise has not written rows in this run dir."},
  labels: {title: "Labels: the judge's preferences", part: () => DATA.labels, what: "labelled pairs", controls: labelControls, rows: labelRows, card: labelCard,
    empty: "label_preferences has not written rows in this run dir."},
  models: {title: "Models: held-out prompts", part: () => DATA.responses, what: "held-out prompts", controls: modelControls, rows: modelRows, card: modelCard,
    empty: "evaluate has not written answers in this run dir."},
};

function update() {
  const v = LISTS[state.view], rows = v.rows();
  list.replaceChildren(...rows.map(v.card));
  count.textContent = `${rows.length} of ${v.part().rows.length} rows shown` + (state.q ? ` (search: "${state.q}")` : "") + ".";
}

function render(view) {
  state.view = view;
  const main = document.getElementById("main");
  main.replaceChildren();
  for (const a of document.querySelectorAll("#tabs a")) {
    if (a.dataset.view === view) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  if (view === "overview") { list = null; overview(main); return; }
  const v = LISTS[view];
  main.append(el("h2", {}, v.title));
  if (!v.part().total) { main.append(el("p", {class: "note"}, v.empty)); list = null; return; }
  count = el("p", {class: "count", role: "status", "aria-live": "polite"});
  list = el("div", {class: "cards"});
  main.append(el("div", {class: "controls"}, v.controls()), el("p", {class: "note"}, leftOut(v.part(), v.what)), count, list);
  update();
}

function focusRow(view, id) {
  const find = () => list && [...list.children].find(c => c.dataset.key === id);
  let target = find();
  if (!target && LISTS[view] && LISTS[view].part().rows.some(r => r.id === id)) {  // hidden by a filter: clear them
    state.q = document.getElementById("q").value = "";
    state[view] = {...FILTERS[view]};
    render(view);
    target = find();
  }
  if (!target) {
    document.getElementById("main").prepend(el("p", {class: "alert", role: "alert"},
      `Row ${id} is not in this page (left out by evaluate.report_rows, or not in this run).`));
    return;
  }
  target.classList.add("target");
  for (const d of target.querySelectorAll("details")) d.open = true;
  target.scrollIntoView({block: "start"});
  target.focus({preventScroll: true});
}

function route() {
  const [view, ...rest] = location.hash.slice(1).split("/");
  const known = VIEWS.some(v => v[0] === view) ? view : "overview";
  render(known);
  if (rest.length && known !== "overview") focusRow(known, decodeURIComponent(rest.join("/")));
}

function keys(e) {
  const typing = /^(INPUT|SELECT|TEXTAREA)$/.test(e.target.tagName);
  const q = document.getElementById("q");
  if (e.key === "Escape" && e.target === q) { q.value = state.q = ""; list ? update() : hits(); return; }
  if (typing || e.altKey || e.ctrlKey || e.metaKey) return;
  if (e.key === "/") { e.preventDefault(); q.focus(); return; }
  if ((e.key === "j" || e.key === "k") && list && list.children.length) {
    const cards = [...list.children], at = cards.indexOf(document.activeElement.closest(".card"));
    const next = cards[Math.max(0, Math.min(cards.length - 1, at < 0 ? 0 : at + (e.key === "j" ? 1 : -1)))];
    next.focus();
    next.scrollIntoView({block: "nearest"});
  }
}

document.getElementById("title").textContent = `cai_lite run: ${DATA.run}`;
document.title = `${DATA.run} · cai_lite run browser`;
document.getElementById("tabs").append(...VIEWS.map(([id, name]) => el("li", {}, el("a", {href: "#" + id, "data-view": id}, name))));
document.getElementById("q").addEventListener("input", e => { state.q = e.target.value.trim(); list ? update() : hits(); });
document.addEventListener("keydown", keys);
window.addEventListener("hashchange", route);
route();
document.body.dataset.ready = String(Math.round(performance.now()));  // tests read when the first view was drawn
