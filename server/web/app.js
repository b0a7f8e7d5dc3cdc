// The snnet-serve page: one ES module, no framework, no build step, nothing from another origin.
// It only calls the public API (GET /stitches, GET /controller, POST /classify), with URLs
// relative to the page, so it also works behind a path prefix.

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const BURST_S = 3;  // the burst: this long, single-image requests at ui.burstRate per second

const HISTORY_S = 30;

const ui = {
  menu: null,       // GET /stitches
  byId: new Map(),  // stitch id -> row
  answered: null,   // the stitch id that answered last
  allowed: null,    // Set of stitch ids the controller allows now (null: all)
  sloTarget: null,  // the share of budgets the server promises to meet (GET /controller)
  lo: 1, hi: 100,   // the budget slider's range, ms
  file: null,       // an image file chosen or dropped (sent as is)
  inked: false,     // something drawn on the pad
  history: [],      // [seconds, load level] for the sparkline
  burstRate: 100,   // requests/s: set from the menu, or ?burst_rate= in the page's URL
  burstLevel: 0,    // the highest load level seen during the last burst
  front: new Set(), // stitch ids on the chart's front (predicted time against score)
  bursting: false,
};

// -- helpers ------------------------------------------------------------------------------------

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

const fmtMs = (ms) => (ms >= 100 ? ms.toFixed(0) : ms >= 10 ? ms.toFixed(1) : ms.toFixed(2));
const fmtShare = (x) => `${+(100 * x).toFixed(1)}%`;  // 0.99 -> "99%", 0.995 -> "99.5%"

function fmtCost(gflops) {
  if (gflops >= 1) return `${gflops.toFixed(2)} GFLOPs`;
  if (gflops >= 1e-3) return `${(gflops * 1e3).toFixed(gflops >= 0.1 ? 0 : 2)} MFLOPs`;
  return `${(gflops * 1e6).toFixed(0)} kFLOPs`;
}

// The error a response carries, in words a person can act on.
async function explain(response) {
  let detail = response.statusText;
  try {
    const body = await response.json();
    detail = body.detail ?? body.error ?? detail;
  } catch { /* not JSON: keep the status text */ }
  if (typeof detail !== "string") detail = JSON.stringify(detail);
  const retry = response.headers.get("Retry-After");
  switch (response.status) {
    case 422: return { title: "Not possible as asked (422)", detail };
    case 503: return { title: "Server busy: request shed (503)",
                       detail: `${detail}${retry ? ` (retry after ${retry} s)` : ""}` };
    case 401: return { title: "This server needs an API key (401)",
                       detail: `${detail}. The page sends none: with SNNET_API_KEY set, call the API with the X-API-Key header instead.` };
    case 413: return { title: "Image too large (413)", detail };
    case 400: case 415: return { title: `Not an image the server can read (${response.status})`, detail };
    default: return { title: `Error ${response.status}`, detail };
  }
}

// -- the stitch menu ----------------------------------------------------------------------------

// A stitch's place on the chart: its compute time at batch 1 as the planner predicts it now
// (the profile measured on this server, calibrated to served time and corrected online).
// The y axis: held-out accuracy, or GFLOPs for a checkpoint without accuracies (then the
// server ranks stitches by cost too).
const score = (row) => (ui.scored ? row.accuracy : row.gflops * 1e3);
const compute = (row) => row.predicted_ms["1"] ?? Object.values(row.predicted_ms)[0];
const measured = (row) => row.latency_ms["1"] ?? Object.values(row.latency_ms)[0];

async function loadMenu() {
  for (;;) {
    try {
      const r = await fetch("stitches");
      if (r.ok) return r.json();
      $("model").textContent = r.status === 503 ? "The model is loading and being profiled\u2026"
                                                : `GET /stitches failed: ${r.status}`;
    } catch {
      $("model").textContent = "The server does not answer; retrying\u2026";
    }
    await new Promise((done) => setTimeout(done, 1000));
  }
}

function showMenu(menu) {
  ui.menu = menu;
  ui.byId = new Map(menu.stitches.map((row) => [row.id, row]));
  ui.scored = menu.stitches.every((row) => typeof row.accuracy === "number");
  const times = menu.stitches.map((row) => row.predicted_ms["1"]);
  ui.lo = Math.min(...times);
  ui.hi = 3 * Math.max(...times);
  // The burst's rate: what the most accurate stitch computes at batch 1, at most 200/s: more
  // than it can serve within the controller's target utilisation, so the level must rise and
  // move requests to cheaper stitches (at 0.4 of it the level rose only when the model had
  // every core and contended with the HTTP process; with a core left to HTTP it stayed 0).
  // A browser keeps at most 6 requests in flight to one server (HTTP/1.1), so what exceeds
  // that waits in the browser: it counts in the round trips shown, not in the server's clock.
  const asked = Number(new URLSearchParams(location.search).get("burst_rate"));
  const best = menu.stitches.reduce((a, b) => (score(b) > score(a) ? b : a));
  ui.burstRate = asked > 0 ? asked : Math.round(Math.min(200, Math.max(20, 1000 / compute(best))));
  $("burst-what").textContent = `up to ${ui.burstRate} requests/s of your image at your ` +
    `budget for ${BURST_S} s (at most 6 in flight: a browser's limit)`;
  $("budget-lo").textContent = `${fmtMs(ui.lo)} ms (fastest stitch)`;
  $("budget-hi").textContent = `${fmtMs(ui.hi)} ms (slowest \u00d7 3)`;
  setBudget(ui.hi);  // generous: the first answer comes from the most accurate stitch
  $("model").textContent = `${menu.model ?? "model"}: ${menu.stitches.length} stitches on ` +
    `${menu.device} (${menu.dtype}); ` + (ui.scored
      ? `the most accurate, #${best.id}, scores ${best.accuracy}%`
      : "the checkpoint has no accuracies: stitches rank by cost");
  if (menu.anchors) {
    $("anchors").textContent = "Anchors: " + menu.anchors
      .map((a) => `${a.short_name} = ${a.display_name}`).join("; ");
  }
  drawChart();
}

function drawChart() {
  const chart = $("chart");
  chart.replaceChildren();
  $("tip").hidden = true;  // its mark is gone
  if (!ui.menu) return;
  const W = 600, H = 380, L = 48, R = 16, T = 14, B = 40;
  const rows = ui.menu.stitches;
  const xs = rows.map(compute), ys = rows.map(score);
  const xMax = Math.max(...xs) * 1.08, xMin = Math.min(0, ...xs);
  const pad_ = ui.scored ? [1, 0.5] : [0, 0];
  const yMin = Math.floor(Math.min(...ys) - pad_[0]), yMax = Math.ceil(Math.max(...ys) + pad_[1]) || 1;
  const X = (v) => L + ((v - xMin) / (xMax - xMin)) * (W - L - R);
  const Y = (v) => T + (1 - (v - yMin) / (yMax - yMin)) * (H - T - B);

  chart.append(svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
  chart.append(svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  for (let i = 0; i <= 5; i++) {
    const v = xMin + ((xMax - xMin) * i) / 5, w = yMin + ((yMax - yMin) * i) / 5;
    chart.append(svg("text", { x: X(v), y: H - B + 14, "text-anchor": "middle" }, fmtMs(v)));
    chart.append(svg("text", { x: L - 6, y: Y(w) + 4, "text-anchor": "end" }, w.toFixed(1)));
  }
  chart.append(svg("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle" },
                   "predicted compute time at batch 1, ms (profiled on this server)"));
  chart.append(svg("text", { x: 12, y: T + (H - T - B) / 2, "text-anchor": "middle",
                             transform: `rotate(-90 12 ${T + (H - T - B) / 2})` },
                   ui.scored ? "held-out top-1 accuracy, %" : "MFLOPs (no accuracies)"));

  const front = chartFront(rows);
  chart.append(svg("polyline", { class: "front",
    points: front.map((r) => `${X(compute(r))},${Y(score(r))}`).join(" ") }));

  const budget = readBudget();
  if (budget) {
    const bx = X(Math.min(budget, xMax));
    chart.append(svg("line", { class: "budget", x1: bx, y1: T, x2: bx, y2: H - B }));
    const label = `your budget, ${fmtMs(budget)} ms${budget > xMax ? " \u2192" : ""}`;
    chart.append(svg("text", { class: "budget-label", x: bx - 4, y: T + 10, "text-anchor": "end" }, label));
  }

  for (const row of rows) {
    const off = ui.allowed !== null && !ui.allowed.has(row.id) ? " off" : "";
    const x = X(compute(row)), y = Y(score(row));
    const mark = row.anchors.length === 1
      ? svg("rect", { class: `pt anchor${off}`, x: x - 5, y: y - 5, width: 10, height: 10 })
      : svg("circle", { class: `pt${off}`, cx: x, cy: y, r: 4.5 });
    mark.dataset.id = row.id;
    mark.append(svg("title", {}, describe(row)));
    mark.addEventListener("mouseenter", (e) => showTip(e, row));
    mark.addEventListener("mouseleave", () => { $("tip").hidden = true; });
    chart.append(mark);
  }
  const hit = ui.answered !== null && ui.byId.get(ui.answered);
  if (hit) {
    chart.append(svg("circle", { class: "answered", cx: X(compute(hit)), cy: Y(score(hit)), r: 10 }));
  }
}

// The front of what the chart plots: the stitches that no other beats on both predicted time and
// score, from the fastest up. (GET /stitches's `pareto` is the front on GFLOPs, the checkpoint's
// own cost; drawn against the time measured here it zig-zagged: a stitch on the GFLOPs front can
// be slower than a more accurate one on this machine.)
function chartFront(rows) {
  const byTime = [...rows].sort((a, b) => compute(a) - compute(b) || score(b) - score(a));
  const front = [];
  for (const row of byTime) {
    if (!front.length || score(row) > score(front[front.length - 1])) front.push(row);
  }
  ui.front = new Set(front.map((row) => row.id));
  return front;
}

function describe(row) {
  const acc = typeof row.accuracy === "number" ? `accuracy ${row.accuracy}%` : "no accuracy";
  return `#${row.id} ${row.description}\n${acc} \u00b7 ${fmtCost(row.gflops)} \u00b7 ` +
    `${row.params_m.toFixed(3)} M params\ncompute at batch 1: ${fmtMs(compute(row))} ms predicted, ` +
    `${fmtMs(measured(row))} ms ${row.measured ? "profiled" : "estimated from FLOPs"}` +
    `${ui.front.has(row.id) ? "\non the chart's front: no stitch is both faster and better" : ""}`;
}

function showTip(event, row) {
  const tip = $("tip"), card = $("menu").getBoundingClientRect();
  tip.textContent = describe(row);
  tip.style.whiteSpace = "pre-line";
  tip.style.left = `${event.clientX - card.left + 12}px`;
  tip.style.top = `${event.clientY - card.top + 12}px`;
  tip.hidden = false;
}

// -- the budget ---------------------------------------------------------------------------------

function setBudget(ms) {
  const v = Math.log(ms / ui.lo) / Math.log(ui.hi / ui.lo);
  $("budget").value = String(Math.round(1000 * Math.min(1, Math.max(0, v))));
  $("budget-ms").value = ms.toFixed(ms < 10 ? 2 : 1);
  $("budget").setAttribute("aria-valuetext", `${fmtMs(ms)} ms`);
  drawChart();
}

function readBudget() {
  const ms = parseFloat($("budget-ms").value);
  return Number.isFinite(ms) && ms > 0 ? ms : null;
}

// The budget a request goes with: the box's, or none (empty: the server's default). Anything
// else is said, not dropped: a budget of -3 went as none, and the answer read "Budget of
// 1000 ms met".
function budgetToSend() {
  const box = $("budget-ms");
  if (!box.validity.badInput && !box.value.trim()) return { ms: null };
  const ms = readBudget();
  if (ms) return { ms };
  return {
    error: {
      title: "Not a budget",
      detail: `The budget box holds ${box.validity.badInput ? "something that is not a number" : `"${box.value}"`}: `
        + "give a latency budget in ms above 0, or leave it empty for the server's default.",
    },
  };
}

$("budget").addEventListener("input", () => {
  const ms = ui.lo * Math.pow(ui.hi / ui.lo, $("budget").valueAsNumber / 1000);
  $("budget-ms").value = ms.toFixed(ms < 10 ? 2 : 1);
  $("budget").setAttribute("aria-valuetext", `${fmtMs(ms)} ms`);
  drawChart();
});
$("budget-ms").addEventListener("change", () => {
  const ms = readBudget();
  if (ms) setBudget(ms);
});

// -- the drawing pad ----------------------------------------------------------------------------

const pad = $("pad");
const ink = pad.getContext("2d", { willReadFrequently: true });

function clearPad() {
  ink.fillStyle = "#000";
  ink.fillRect(0, 0, pad.width, pad.height);
  ui.inked = false;
  ui.file = null;
  $("file").value = "";
  $("file-name").textContent = "";
}

function padPoint(e) {
  const box = pad.getBoundingClientRect();
  return [(e.clientX - box.left) * (pad.width / box.width), (e.clientY - box.top) * (pad.height / box.height)];
}

let last = null;
pad.addEventListener("pointerdown", (e) => {
  if (ui.file) clearPad();  // drawing replaces a chosen file
  pad.setPointerCapture(e.pointerId);
  last = padPoint(e);
  stroke(last, last);
});
pad.addEventListener("pointermove", (e) => {
  if (!last) return;
  const p = padPoint(e);
  stroke(last, p);
  last = p;
});
for (const end of ["pointerup", "pointercancel", "lostpointercapture"]) {
  pad.addEventListener(end, () => { last = null; });
}

function stroke(a, b) {
  ink.strokeStyle = "#fff";
  ink.lineWidth = 20;
  ink.lineCap = "round";
  ink.beginPath();
  ink.moveTo(...a);
  ink.lineTo(...b);
  ink.stroke();
  ui.inked = true;
}

// What the pad sends: the drawing cropped to its ink, scaled into a 20-pixel box and centred
// in 28x28, as MNIST digits are (the server would squash the whole pad otherwise).
function padImage() {
  const { data, width, height } = ink.getImageData(0, 0, pad.width, pad.height);
  let x0 = width, y0 = height, x1 = -1, y1 = -1;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (data[4 * (y * width + x)] > 32) {
        x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y);
      }
    }
  }
  if (x1 < 0) return null;
  const side = Math.max(x1 - x0, y1 - y0) + 1, scale = 20 / side;
  const out = el("canvas", { width: 28, height: 28 }), g = out.getContext("2d");
  g.fillStyle = "#000";
  g.fillRect(0, 0, 28, 28);
  const w = (x1 - x0 + 1) * scale, h = (y1 - y0 + 1) * scale;
  g.drawImage(pad, x0, y0, x1 - x0 + 1, y1 - y0 + 1, (28 - w) / 2, (28 - h) / 2, w, h);
  return new Promise((done) => out.toBlob(done, "image/png"));
}

async function currentImage() {
  if (ui.file) return { blob: ui.file, name: ui.file.name };
  const blob = ui.inked ? await padImage() : null;
  return blob ? { blob, name: "drawing.png" } : null;
}

function useFile(file) {
  if (!file || !file.type.startsWith("image/")) {
    const kept = ui.file ? `${ui.file.name} is still the image sent`
      : ui.inked ? "the drawing is still what is sent" : "nothing is chosen yet";
    showError({ title: "Not an image file", detail: `${file ? `${file.name} is not an image` : "No file"}; ${kept}.` });
    return;
  }
  clearPad();
  ui.file = file;  // chosen now; the preview follows when the browser has decoded it
  $("file-name").textContent = file.name;
  pad.dataset.source = "";
  const img = new Image();
  img.onerror = () => {
    URL.revokeObjectURL(img.src);
    pad.dataset.source = file.name;  // this browser cannot show it; the server may read it
  };
  img.onload = () => {
    const s = Math.min(pad.width / img.width, pad.height / img.height);
    ink.imageSmoothingEnabled = false;
    ink.drawImage(img, (pad.width - img.width * s) / 2, (pad.height - img.height * s) / 2,
                  img.width * s, img.height * s);
    URL.revokeObjectURL(img.src);
    pad.dataset.source = file.name;
  };
  img.src = URL.createObjectURL(file);
}

$("clear").addEventListener("click", clearPad);
$("file").addEventListener("change", () => useFile($("file").files[0]));
pad.addEventListener("dragover", (e) => { e.preventDefault(); pad.classList.add("drop"); });
pad.addEventListener("dragleave", () => pad.classList.remove("drop"));
pad.addEventListener("drop", (e) => {
  e.preventDefault();
  pad.classList.remove("drop");
  useFile(e.dataTransfer.files[0]);
});

// -- classify -----------------------------------------------------------------------------------

function form(image, copies, budget) {
  const body = new FormData();
  for (let i = 0; i < copies; i++) body.append("image", image.blob, image.name);
  if (budget) body.append("latency_budget_ms", String(budget));
  return body;  // (top_k: the server's default, at most the model's classes; 3 are shown)
}

function showError({ title, detail }) {
  const box = $("answer");
  delete box.dataset.stitch;
  delete box.dataset.label;
  box.replaceChildren(el("p", { class: "error" }, title), el("p", { class: "error muted" }, detail));
  const least = /latency_budget_ms >= ([0-9.]+)/.exec(detail);
  if (least) {  // a budget that is too tight says which one would do: offer it
    const ms = parseFloat(least[1]) * 1.05;
    const use = el("button", { type: "button" }, `Use ${fmtMs(ms)} ms`);
    use.addEventListener("click", () => { setBudget(ms); send(); });
    box.lastChild.append(use);
  }
}

function showAnswer(answer, roundTripMs) {
  const box = $("answer");
  box.replaceChildren();
  answer.predictions[0].slice(0, 3).forEach((p, i) => {
    const line = el("div", { class: i === 0 ? "pred top" : "pred" });
    const bar = el("div", { class: "bar" });
    bar.style.width = `${Math.max(1, 100 * p.score)}%`;
    line.append(el("span", {}, p.label), el("div", {}), el("span", {}, `${(100 * p.score).toFixed(1)}%`));
    line.children[1].append(bar);
    box.append(line);
  });
  const s = answer.stitch, t = answer.timing;
  const acc = typeof s.accuracy === "number" ? `${s.accuracy}% held-out, ` : "";
  box.append(el("p", {}, `Answered by stitch #${s.id} ${s.description} (${acc}${fmtCost(s.gflops)})`));
  const met = answer.budget_met;
  const table = el("table", { class: "timing" });
  const rows = [["queue", t.queue_ms], ["compute", t.compute_ms], ["total in the server", t.total_ms],
                ["predicted", t.predicted_ms], ["round trip in this browser", roundTripMs]];
  for (const [name, ms] of rows) {
    const tr = el("tr");
    tr.append(el("td", {}, name), el("td", {}, `${fmtMs(ms)} ms`));
    table.append(tr);
  }
  box.append(table);
  if (met !== null && met !== undefined) {
    box.append(el("p", { class: met ? "ok" : "late" },
      met ? `Budget of ${fmtMs(answer.latency_budget_ms)} ms met.`
          : `Budget of ${fmtMs(answer.latency_budget_ms)} ms missed.`));
  }
  if (answer.best_effort) {
    box.append(el("p", { class: "muted" }, "Best effort: this budget is below what the server " +
      `promises to meet${ui.sloTarget ? ` ${fmtShare(ui.sloTarget)} of the time` : ""}, so the fastest stitch ` +
      "answered it; it meets such budgets most of the time when idle."));
  }
  box.dataset.stitch = s.id;
  box.dataset.label = answer.predictions[0][0].label;
}

async function send() {
  const button = $("send");
  if (button.disabled) return;
  button.disabled = true;
  try {
    const image = await currentImage();
    if (!image) {
      showError({ title: "Nothing to classify", detail: "Draw on the pad or choose an image file first." });
      $("answer").dataset.status = "none";
      return;
    }
    const budget = budgetToSend();
    if (budget.error) {
      showError(budget.error);
      $("answer").dataset.status = "none";
      return;
    }
    const started = performance.now();
    const r = await fetch("classify", { method: "POST", body: form(image, 1, budget.ms) });
    if (!r.ok) {
      showError(await explain(r));
      $("answer").dataset.status = r.status;
      return;
    }
    const answer = await r.json();
    showAnswer(answer, performance.now() - started);
    $("answer").dataset.status = r.status;
    ui.answered = answer.stitch.id;
    drawChart();
  } catch (e) {
    showError({ title: "No answer", detail: `The server did not answer (${e.message}).` });
    $("answer").dataset.status = "error";
  } finally {
    button.disabled = false;
  }
}
$("send").addEventListener("click", send);

// -- the controller -----------------------------------------------------------------------------

function showState(c) {
  const total = ui.menu ? ui.menu.stitches.length : c.allowed_stitches.length;
  const top = c.allowed_stitches[0];
  const items = [
    ["load level", `${c.load_level.toFixed(2)}`],
    ["arrivals", `${c.arrival_rate.toFixed(1)} req/s \u00b7 ${c.image_rate.toFixed(0)} img/s`],
    ["queued work", `${fmtMs(c.queued_work_ms)} ms`],
    ["stitches allowed", `${c.allowed_stitches.length} of ${total}`],
    ["most preferred allowed", top === undefined ? "-" : `#${top}${ui.scored && ui.byId.has(top) ? ` (${ui.byId.get(top).accuracy}%)` : ""}`],
    ["mix", c.mix ? `#${c.mix.dearer_stitch} for ${(100 * c.mix.dearer_share).toFixed(0)}%, else #${c.mix.cheaper_stitch}` : "none"],
    ["safety margin", `${(100 * c.margin).toFixed(0)}%${c.margin_ms ? ` + ${fmtMs(c.margin_ms)} ms` : ""}`],
    ["promise", `${fmtShare(c.slo_target)} of budgets met`],
  ];
  ui.sloTarget = c.slo_target;
  const dl = $("state");
  dl.replaceChildren();
  for (const [k, v] of items) {
    const d = el("div");
    d.append(el("dt", {}, k), el("dd", {}, v));
    d.dataset.key = k;
    dl.append(d);
  }
  const allowed = c.allowed_stitches.length === total ? null : new Set(c.allowed_stitches);
  const key = (set) => (set === null ? "all" : [...set].sort((a, b) => a - b).join(","));
  const changed = key(allowed) !== key(ui.allowed);
  ui.allowed = allowed;
  if (changed) drawChart();
}

function drawSpark() {
  const spark = $("spark"), now = performance.now() / 1000, W = 600;
  ui.history = ui.history.filter(([t]) => now - t <= HISTORY_S);
  spark.replaceChildren(
    svg("text", { x: 4, y: 10 }, "load level, last 30 s"),
    svg("text", { x: W - 4, y: 10, "text-anchor": "end" }, "1"),
    svg("text", { x: W - 4, y: 66, "text-anchor": "end" }, "0"),
    svg("polyline", { points: ui.history
      .map(([t, v]) => `${(W * (1 - (now - t) / HISTORY_S)).toFixed(1)},${(66 - 54 * v).toFixed(1)}`)
      .join(" ") }),
  );
}

async function poll() {
  try {
    const r = await fetch("controller", { signal: AbortSignal.timeout(3000) });
    if (r.ok) {
      const c = await r.json();
      ui.history.push([performance.now() / 1000, c.load_level]);
      if (ui.bursting) ui.burstLevel = Math.max(ui.burstLevel, c.load_level);
      showState(c);
    }
  } catch { /* the server restarts or is gone: keep polling */ }
  drawSpark();
  setTimeout(poll, ui.bursting ? 200 : 1000);
}

async function burst() {
  const image = await currentImage();
  const out = $("burst-result");
  if (!image) {
    out.textContent = "Draw on the pad or choose an image file first: the burst sends it.";
    return;
  }
  const { ms: budget, error } = budgetToSend();
  if (error) {
    out.textContent = error.detail;
    return;
  }
  $("burst").disabled = true;
  ui.bursting = true;
  ui.burstLevel = 0;
  out.textContent = `Sending ${ui.burstRate} requests/s for ${BURST_S} s\u2026`;
  delete out.dataset.answered;
  const counts = new Map(), used = new Map(), details = new Map();
  let met = 0, metHere = 0;
  // Open loop: requests are issued at a steady rate whether or not earlier ones were answered,
  // as independent users would send them (the browser holds back what exceeds 6 in flight).
  const one = async () => {
    try {
      const sent = performance.now();
      const r = await fetch("classify", { method: "POST", body: form(image, 1, budget) });
      counts.set(r.status, (counts.get(r.status) ?? 0) + 1);
      if (r.ok) {
        const a = await r.json();
        used.set(a.stitch.id, (used.get(a.stitch.id) ?? 0) + 1);
        if (a.budget_met !== false) met++;
        if (!budget || performance.now() - sent <= budget) metHere++;
      } else if (r.status === 503 || details.has(r.status)) {
        await r.arrayBuffer();
      } else {  // say why, once per status: these are not load
        details.set(r.status, (await r.json().catch(() => ({}))).detail ?? r.statusText);
      }
    } catch {
      counts.set("no answer", (counts.get("no answer") ?? 0) + 1);
    }
  };
  const pending = [];
  const start = performance.now();
  for (let i = 0; i < BURST_S * ui.burstRate; i++) {
    const due = start + (1000 * i) / ui.burstRate;
    const wait = due - performance.now();
    if (wait > 0) await new Promise((done) => setTimeout(done, wait));
    pending.push(one());
  }
  await Promise.all(pending);
  ui.bursting = false;
  $("burst").disabled = false;
  const sent = [...counts.values()].reduce((a, b) => a + b, 0);
  const ok = counts.get(200) ?? 0, shed = counts.get(503) ?? 0;
  const others = [...counts].filter(([s]) => s !== 200 && s !== 503)
    .map(([s, n]) => `${n} \u00d7 ${s}` + (details.has(s) ? ` (${details.get(s)})` : ""));
  const mix = [...used].sort((a, b) => b[1] - a[1]).map(([s, n]) => `#${s} \u00d7 ${n}`).join(", ");
  out.textContent = `${sent} requests in ${BURST_S} s: ${ok} answered, ${met} within the budget ` +
    `by the server's clock (${metHere} by this browser's, which includes waiting for one of ` +
    `its 6 connections), by stitches ${mix || "-"}; ${shed} shed with 503` +
    `${others.length ? `; ${others.join(", ")}` : ""}. ` +
    (ui.burstLevel > 0
      ? `The load level rose to ${ui.burstLevel.toFixed(2)}; watch it fall back.`
      : ok === sent
        ? "The load level stayed at 0: this server kept up without giving up accuracy."
        : "The load level stayed at 0.");
  out.dataset.answered = ok;
  out.dataset.shed = shed;
  out.dataset.sent = sent;
  out.dataset.stitches = [...used.keys()].join(",");
  out.dataset.level = ui.burstLevel;
}
$("burst").addEventListener("click", burst);

// -- start --------------------------------------------------------------------------------------

clearPad();
poll();
showMenu(await loadMenu());
