"""The self-contained report.html: one file, no network, data embedded as JSON and rendered by plain JavaScript.

Safety: every string from the corpus, the tokenizer or a file name reaches the page only inside the JSON block,
with `<`, `>` and `&` written as \\u escapes (so `</script>` cannot end the block), and the script puts it on
the page with `textContent`, never as markup.
"""

from __future__ import annotations

import base64
import json
import math

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sae-toolkit report</title>
<style>
:root { --fg:#1f2328; --muted:#656d76; --line:#d8dee4; --bg:#f6f8fa; --accent:#0b6bcb; --act:255,120,0; }
* { box-sizing:border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; color:var(--fg);
       background:#fff; }
header { padding:14px 24px 10px; border-bottom:1px solid var(--line); background:var(--bg); }
header h1 { margin:0; font-size:20px; }
header .sub { color:var(--muted); font-size:13px; margin-top:2px; }
main { padding:12px 24px 40px; }
h2 { font-size:16px; margin:14px 0 6px; }
h4 { font-size:13px; margin:10px 0 4px; color:var(--muted); text-transform:uppercase; letter-spacing:.04em; }
.cards { display:flex; flex-wrap:wrap; gap:8px; }
.card { border:1px solid var(--line); border-radius:8px; padding:4px 12px; min-width:104px; background:#fff; }
.card .v { font-size:18px; font-weight:600; font-variant-numeric:tabular-nums; }
.card .k { color:var(--muted); font-size:12px; }
.plots { display:flex; flex-wrap:wrap; gap:10px; }
.plots img { height:150px; border:1px solid var(--line); border-radius:6px; background:#fff; }
#browser { display:grid; grid-template-columns:290px 1fr; gap:14px; align-items:start; }
#side { border:1px solid var(--line); border-radius:8px; overflow:hidden; }
#side .ctl { padding:8px; background:var(--bg); border-bottom:1px solid var(--line); display:flex; gap:6px;
             flex-wrap:wrap; }
#side input, #side select { font:inherit; padding:4px 6px; border:1px solid var(--line); border-radius:6px; }
#side input { flex:1 1 100%; }
#list { max-height:640px; overflow:auto; }
#list .row { padding:4px 10px; border-bottom:1px solid #eef1f4; cursor:pointer; display:flex; gap:8px;
             align-items:baseline; }
#list .row:hover { background:#f0f6ff; }
#list .row.sel { background:#dbeafe; }
#list .row .i { font-weight:600; min-width:46px; font-variant-numeric:tabular-nums; }
#list .row .t { color:var(--muted); overflow:hidden; white-space:nowrap; text-overflow:ellipsis; flex:1;
                font-family:ui-monospace,monospace; font-size:12px; }
#list .row .d { color:var(--muted); font-size:11px; font-variant-numeric:tabular-nums; }
#count { color:var(--muted); font-size:12px; padding:4px 10px; }
#detail { border:1px solid var(--line); border-radius:8px; padding:12px 16px; min-height:300px; }
#detail h3 { margin:0 0 6px; font-size:18px; }
.stats { display:flex; flex-wrap:wrap; gap:4px 18px; color:var(--muted); font-size:13px; margin-bottom:8px; }
.stats b { color:var(--fg); font-variant-numeric:tabular-nums; }
.cols { display:grid; grid-template-columns:minmax(0, 1fr) 250px; gap:18px; }
.lens table { border-collapse:collapse; width:100%; font-size:12px; margin-bottom:6px; }
.lens td { padding:1px 4px; border-bottom:1px solid #eef1f4; }
.lens td.num { text-align:right; font-variant-numeric:tabular-nums; color:var(--muted); width:64px; }
.lens .pos .tv { color:#0a6b2f; } .lens .neg .tv { color:#b42318; }
.tv { font-family:ui-monospace,monospace; white-space:pre; background:#eef1f4; border-radius:3px; padding:0 2px; }
.ex { font-family:ui-monospace,monospace; font-size:12.5px; padding:3px 0; border-bottom:1px dashed #eef1f4;
      white-space:pre-wrap; word-break:break-all; }
.ex .val { display:inline-block; min-width:62px; color:var(--muted); font-variant-numeric:tabular-nums; }
.ex span.tk { border-radius:2px; }
.ex span.pk { outline:1.5px solid rgb(var(--act)); }
.muted { color:var(--muted); }
.badge { font-size:11px; border-radius:10px; padding:0 6px; background:#fff1e5; color:#953800;
         border:1px solid #f0c8a8; }
#side label { font-size:12px; color:var(--muted); display:flex; gap:4px; align-items:center; }
.note { color:var(--muted); font-size:12px; }
</style>
</head>
<body>
<header><h1 id="title">sae-toolkit report</h1><div class="sub" id="subtitle"></div></header>
<main>
<h2>Overview</h2>
<div class="cards" id="cards"></div>
<div class="note" id="notes"></div>
<h2>Plots</h2>
<div class="plots" id="plots"></div>
<h2>Feature browser</h2>
<div id="browser">
  <div id="side">
    <div class="ctl">
      <input id="q" type="search" placeholder="feature index or token, e.g. 12 or def" autocomplete="off">
      <select id="sort">
        <option value="max">sort: max activation</option>
        <option value="density">sort: density</option>
        <option value="index">sort: index</option>
      </select>
      <label id="sinkctl"><input id="sinks" type="checkbox"> show sink latents</label>
    </div>
    <div id="count"></div>
    <div id="list"></div>
  </div>
  <div id="detail"></div>
</div>
</main>
<script type="application/json" id="report-data">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("report-data").textContent);
const V = D.vocab;
const F = D.features;  // [index, density, mean, max, enc_dec_cos, nearest, nearest_cos, max_token, sink]
const el = (tag, cls, text) => { const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text; return e; };
const fmt = (v, d) => (v === null || v === undefined || Number.isNaN(v)) ? "n/a" :
  (Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(2) : v.toFixed(d === undefined ? 3 : d));
const sig = (v) => (v === null || v === undefined) ? "n/a" : Number(v).toPrecision(3);
const show = (t) => t.replace(/\\n/g, "\\u21b5").replace(/\\t/g, "\\u21e5");

document.getElementById("title").textContent = D.meta.title;
document.getElementById("subtitle").textContent = D.meta.subtitle;
const cards = document.getElementById("cards");
for (const [label, value] of D.cards) {
  const c = el("div", "card"); c.append(el("div", "v", value), el("div", "k", label)); cards.append(c);
}
document.getElementById("notes").textContent = D.meta.notes;
const plots = document.getElementById("plots");
for (const [name, src] of D.plots) {
  const img = el("img"); img.src = src; img.alt = name; img.title = name; plots.append(img);
}

const search = F.map((f) => {
  const ex = D.examples[f[0]] || {};
  const peaks = (ex.top || []).map((e) => V[e[3][e[2]]]);
  const lens = D.lens[f[0]] ? D.lens[f[0]].pos.map((p) => V[p[0]]) : [];
  const expl = (D.explanations || {})[f[0]] ? [D.explanations[f[0]][0]] : [];
  return [V[f[7]], ...peaks, ...lens, ...expl].join("\\u0000").toLowerCase();
});
const list = document.getElementById("list"), q = document.getElementById("q"), sort = document.getElementById("sort");
// Sink latents (analysis/sinks.py) peak on massive-activation tokens; they would fill the top of the
// max-activation sort, so the default list leaves them out; the box, or their index, brings them back.
const sinks = document.getElementById("sinks"), nSinks = F.filter((f) => f[8]).length;
if (!nSinks) document.getElementById("sinkctl").style.display = "none";
else document.getElementById("sinkctl").lastChild.textContent = " show " + nSinks + " sink latents";
let selected = D.meta.default_feature;

function renderList() {
  const text = q.value.trim().toLowerCase();
  let rows = F.map((f, i) => i);
  if (/^\\d+$/.test(text)) rows = rows.filter((i) => String(F[i][0]).startsWith(text));
  else if (text) rows = rows.filter((i) => search[i].includes(text));
  const hidden = (sinks.checked || /^\\d+$/.test(text)) ? 0 : rows.filter((i) => F[i][8]).length;
  if (hidden) rows = rows.filter((i) => !F[i][8]);
  const key = sort.value;
  if (key === "max") rows.sort((a, b) => F[b][3] - F[a][3]);
  else if (key === "density") rows.sort((a, b) => F[b][1] - F[a][1]);
  else rows.sort((a, b) => F[a][0] - F[b][0]);
  const shown = rows.slice(0, 400);
  document.getElementById("count").textContent =
    rows.length + " features" + (rows.length > shown.length ? ", first 400 shown" : "") +
    (hidden ? " (" + hidden + " sink latents hidden)" : "");
  list.replaceChildren();
  for (const i of shown) {
    const f = F[i], r = el("div", "row" + (f[0] === selected ? " sel" : ""));
    const t = el("span", "t"); if (V[f[7]]) t.append(el("span", "tv", show(V[f[7]])));
    r.append(el("span", "i", "#" + f[0]), t);
    if (f[8]) r.append(el("span", "badge", "sink"));
    r.append(el("span", "d", sig(f[3])));
    r.onclick = () => select(f[0]);
    list.append(r);
  }
}

function lensTable(cls, rows) {
  const t = el("table", cls), body = el("tbody");
  for (const [tok, v] of rows) {
    const td = el("td"); td.append(el("span", "tv", show(V[tok])));
    const tr = el("tr"); tr.append(td, el("td", "num", fmt(v, 3))); body.append(tr);
  }
  t.append(body); return t;
}

function exampleLine(e, maxAct) {
  // e = [activation, seq, peak index, token ids, values]
  const line = el("div", "ex");
  line.append(el("span", "val", sig(e[0])));
  e[3].forEach((tok, j) => {
    const v = e[4][j], s = el("span", "tk" + (j === e[2] ? " pk" : ""), show(V[tok]));
    const alpha = Math.min(1, 0.12 + 0.88 * v / maxAct).toFixed(3);
    if (v > 0 && maxAct > 0) s.style.background = "rgba(var(--act)," + alpha + ")";
    s.title = "activation " + sig(v);
    line.append(s);
  });
  line.title = "sequence " + e[1];
  return line;
}

function select(idx) {
  selected = idx;
  const pos = F.findIndex((f) => f[0] === idx), det = document.getElementById("detail");
  det.replaceChildren();
  if (pos < 0) { det.append(el("p", "muted", "feature " + idx + " is not in this report")); return; }
  const f = F[pos];
  const h = el("h3", null, "Feature " + f[0] + " ");
  if (f[8]) h.append(el("span", "badge", "sink latent"));
  det.append(h);
  if (f[8]) det.append(el("p", "note", "A sink latent: " + D.meta.sink_rule + "."));
  const st = el("div", "stats");
  for (const [k, v] of [["density", fmt(f[1], 5)], ["mean act", fmt(f[2])], ["max act", fmt(f[3])],
                        ["enc/dec cos", fmt(f[4])], ["nearest", "#" + f[5] + " (cos " + fmt(f[6]) + ")"]]) {
    const s = el("span"); s.append(k + " ", el("b", null, v)); st.append(s);
  }
  det.append(st);
  const expl = (D.explanations || {})[f[0]];
  if (expl) {
    const p = el("p", "expl");
    p.append(el("b", null, "Explanation: "), expl[0] || "(empty)",
             el("span", "muted", " — detection balanced accuracy " + (expl[1] === null ? "n/a" : fmt(expl[1], 2))));
    det.append(p);
  }
  const cols = el("div", "cols"), left = el("div"), right = el("div", "lens");
  cols.append(left, right); det.append(cols);
  const ex = D.examples[f[0]];
  if (!ex || !ex.top.length) { left.append(el("p", "muted", "This latent never fired on the evaluated tokens.")); }
  else {
    left.append(el("h4", null, "Top activations"));
    ex.top.forEach((e) => left.append(exampleLine(e, f[3])));
    if (ex.intervals.length) {
      left.append(el("h4", null, "Samples from activation intervals"));
      ex.intervals.forEach((e) => left.append(exampleLine(e, f[3])));
    }
  }
  const lens = D.lens[f[0]];
  right.append(el("h4", null, "Logit lens"));
  if (lens) {
    right.append(el("div", "note", "promoted"), lensTable("pos", lens.pos),
                 el("div", "note", "suppressed"), lensTable("neg", lens.neg),
                 el("div", "note", "W_dec[f] @ W_U; " + D.meta.lens_note));
  } else {
    right.append(el("div", "note", D.meta.lens_note || "run analyze with --model to see the tokens it promotes"));
  }
  const eff = (D.effects || {})[f[0]];
  if (eff) {
    right.append(el("h4", null, "Ablation effect (measured)"),
                 el("div", "note", "log-prob falls when ablated (it promotes)"), lensTable("pos", eff.falls),
                 el("div", "note", "log-prob rises when ablated (it suppresses)"), lensTable("neg", eff.rises),
                 el("div", "note", "mean change of the next-token log-prob over " + eff.n +
                    " top examples with this feature ablated at the peak"));
  }
  for (const r of list.children) r.classList.toggle("sel", r.firstChild.textContent === "#" + idx);
  if (location.hash !== "#" + idx) history.replaceState(null, "", "#" + idx);
}

q.oninput = () => { renderList(); const text = q.value.trim(); if (/^\\d+$/.test(text)) select(Number(text)); };
sort.onchange = renderList;
sinks.onchange = renderList;
const fromHash = Number(location.hash.slice(1));
if (location.hash.length > 1 && Number.isInteger(fromHash)) selected = fromHash;
renderList();
if (selected !== null) select(selected);
</script>
</body>
</html>
"""


def embed_json(data: object) -> str:
    """JSON that is safe inside <script type="application/json">: no `<`, `>` or `&` appears literally."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_json_default)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _json_default(o: object) -> object:
    raise TypeError(f"cannot embed {type(o).__name__} in the report")


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def finite(v: float | None, digits: int = 4) -> float | None:
    """A float rounded to `digits` significant digits for the page, None for NaN/inf (JSON has neither)."""
    if v is None or not math.isfinite(v):
        return None
    return float(f"{v:.{digits}g}")


def render(data: dict) -> str:
    """The page for `data` = {meta, cards, plots, vocab, features, examples, lens} (see page.py)."""
    return _PAGE.replace("__DATA__", embed_json(data))
