// hpad console: plain JavaScript, no build step, no CDN. Follows /api/stream (server-sent events).
"use strict";

const state = { config: null, cards: new Map() };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

const enc = (id) => encodeURIComponent(id);
const fmt = (x, digits = 3) => (typeof x === "number" ? x.toFixed(digits) : "-");
const when = (ms) => (ms ? new Date(ms).toISOString().replace("T", " ").slice(0, 19) + "Z" : "-");

function token() { return sessionStorage.getItem("hpad-token") || ""; }

function setupMode(config) {
  const mode = document.getElementById("mode");
  mode.textContent = config.feedback_enabled ? "feedback on" : "read-only";
  mode.dataset.mode = config.feedback_enabled ? "feedback" : "read-only";
  if (!config.feedback_enabled) return;
  const box = document.getElementById("token-box");
  const input = el("input", { type: "password", id: "token", placeholder: "operator token", autocomplete: "off" });
  input.value = token();
  input.addEventListener("input", () => sessionStorage.setItem("hpad-token", input.value));
  box.append(input);
}

function feedbackControls(frameId, given) {
  const box = el("div", { class: "feedback", "data-frame-id": frameId });
  const status = el("span", { class: "verdict" });
  for (const f of given || []) status.textContent = `${f.verdict.replace("_", " ")} by ${f.operator}`;
  if (!state.config || !state.config.feedback_enabled) {
    box.append(status);
    return box;  // read-only console: no buttons at all
  }
  const note = el("input", { type: "text", class: "note", placeholder: "note (optional)", maxlength: "1000" });
  box.append(note);
  for (const [verdict, label] of [["false_alarm", "false alarm"], ["real_defect", "real defect"]]) {
    const button = el("button", { type: "button", class: verdict, "data-verdict": verdict, text: label });
    button.addEventListener("click", () => sendFeedback(frameId, verdict, note, status));
    box.append(button);
  }
  box.append(status);
  return box;
}

async function sendFeedback(frameId, verdict, note, status) {
  status.className = "verdict";
  status.textContent = "sending…";
  try {
    const response = await fetch("/api/feedback", {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${token()}` },
      body: JSON.stringify({ frame_id: frameId, verdict, note: note.value }),
    });
    const body = await response.json();
    if (response.status === 201) {
      status.textContent = `${verdict.replace("_", " ")} recorded by ${body.operator}`;
      status.dataset.feedbackId = body.feedback_id;
    } else {
      status.className = "verdict error";
      status.textContent = body.message || `refused (${response.status})`;
    }
  } catch (err) {
    status.className = "verdict error";
    status.textContent = `not sent: ${err}`;
  }
}

function timeline(points) {
  const W = 500, H = 90;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "timeline");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("preserveAspectRatio", "none");
  if (!points.length) return svg;
  const pad = 5;
  const x = (i) => (points.length === 1 ? W / 2 : pad + (i * (W - 2 * pad)) / (points.length - 1));
  const y = (v) => H - pad - Math.max(0, Math.min(1, v)) * (H - 2 * pad);
  const line = (key, cls) => {
    const poly = document.createElementNS(svg.namespaceURI, "polyline");
    poly.setAttribute("class", cls);
    const xy = points.map((p, i) => [x(i), y(p[key])]);
    if (xy.length === 1) xy.splice(0, 1, [0, xy[0][1]], [W, xy[0][1]]);  // one point: a flat line
    poly.setAttribute("points", xy.map(([a, b]) => `${a.toFixed(1)},${b.toFixed(1)}`).join(" "));
    svg.append(poly);
  };
  line("threshold", "threshold");
  line("score", "score");
  points.forEach((p, i) => {
    if (!p.anomaly) return;
    const dot = document.createElementNS(svg.namespaceURI, "circle");
    dot.setAttribute("class", "hit");
    dot.setAttribute("cx", x(i)); dot.setAttribute("cy", y(p.score)); dot.setAttribute("r", 3);
    svg.append(dot);
  });
  return svg;
}

function card(cameraId) {
  let c = state.cards.get(cameraId);
  if (c) return c;
  const root = el("section", { class: "camera", "data-camera-id": cameraId });
  const status = el("span", { class: "status" });
  const img = el("img", { class: "overlay", alt: `latest frame of ${cameraId} with anomaly overlay` });
  const caption = el("p", { class: "caption" });
  const chart = el("div", { class: "chart" });
  const anomalies = el("div", { class: "anomalies" });
  const prompts = el("table", { class: "prompts" });
  root.append(el("h2", {}, el("span", { text: cameraId }), status, el("span", { class: "category" })),
    el("div", { class: "latest" }, img, caption), el("h3", { text: "score (line: threshold)" }), chart,
    el("h3", { text: "recent anomalies" }), anomalies, el("h3", { text: "prompt versions" }), prompts);
  document.getElementById("cameras").append(root);
  document.getElementById("empty").hidden = true;
  c = { root, status, img, caption, chart, anomalies, prompts, figures: new Map() };
  state.cards.set(cameraId, c);
  return c;
}

function renderCamera(snap) {
  const c = card(snap.camera_id);
  c.root.querySelector(".category").textContent = snap.category;
  c.root.classList.toggle("anomaly", snap.status.state === "anomaly");
  c.status.className = `status ${snap.status.state}`;
  c.status.textContent = snap.status.state === "anomaly" ? "ANOMALY" : snap.status.state;
  const latest = snap.latest;
  if (latest && c.img.dataset.frameId !== latest.frame_id + (latest.scored ? ":s" : "")) {
    c.img.dataset.frameId = latest.frame_id + (latest.scored ? ":s" : "");
    c.img.src = `/api/overlay/page/${enc(latest.frame_id)}`;
    c.caption.textContent = `${latest.frame_id} · score ${fmt(latest.score)} / threshold ${fmt(latest.threshold)}`
      + ` · prompts v${latest.prompt_version ?? "-"}` + (latest.random_weights ? " · RANDOM WEIGHTS" : "");
  }
  c.chart.replaceChildren(timeline(snap.timeline));
  const wanted = new Set(snap.anomalies.map((a) => a.frame_id));
  for (const [id, fig] of c.figures) if (!wanted.has(id)) { fig.remove(); c.figures.delete(id); }
  let previous = null;
  for (const a of snap.anomalies) {
    let fig = c.figures.get(a.frame_id);
    if (!fig) {
      fig = el("figure", { class: "anomaly", "data-frame-id": a.frame_id },
        el("a", { href: `/frame/${enc(a.frame_id)}` },
          el("img", { src: `/api/overlay/thumb/${enc(a.frame_id)}`, alt: `anomaly ${a.frame_id} with overlay` })),
        el("figcaption", { text: `score ${fmt(a.score)} · v${a.prompt_version} · ${a.frame_id}` }),
        feedbackControls(a.frame_id, a.feedback));
      c.figures.set(a.frame_id, fig);
    }
    if (previous) previous.after(fig); else c.anomalies.prepend(fig);
    previous = fig;
  }
  const rows = [el("tr", {}, el("th", { text: "version" }), el("th", { text: "source" }),
    el("th", { text: "sha256" }), el("th", { text: "first seen" }), el("th", { text: "events" }))];
  for (const p of snap.prompts) {
    rows.push(el("tr", {}, el("td", { text: `v${p.version}` }), el("td", { text: p.source }),
      el("td", { text: (p.sha256 || "-").slice(0, 12) }), el("td", { text: when(p.first_seen) }),
      el("td", { text: String(p.events) })));
  }
  c.prompts.replaceChildren(...rows);
}

function follow() {
  const live = document.getElementById("live");
  const source = new EventSource("/api/stream");
  source.addEventListener("open", () => { live.className = "live on"; live.textContent = "live"; });
  source.addEventListener("error", () => { live.className = "live off"; live.textContent = "reconnecting"; });
  source.addEventListener("camera", (message) => renderCamera(JSON.parse(message.data)));
}

async function start() {
  const response = await fetch("/api/state");
  const body = await response.json();
  state.config = body.config;
  setupMode(body.config);
  const page = document.body.dataset.page;
  if (page === "line") {
    body.cameras.forEach(renderCamera);
    follow();
  } else if (page === "frame") {
    const slot = document.querySelector(".frame-page .feedback");
    if (slot) slot.replaceWith(feedbackControls(slot.dataset.frameId, []));
  }
}

start();
