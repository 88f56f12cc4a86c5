// Ballast dashboard: confirmations, polled fragments, the live log tail and the metrics charts (uPlot).
"use strict";

const CHARTS = [
  ["Requests/s by status", ["requests_2xx", "requests_4xx", "requests_5xx"]],
  ["Error rate (5xx share)", ["error_rate"]],
  ["Latency, end to end (s)", ["latency_p50", "latency_p95", "latency_p99"]],
  ["Time to first token (s)", ["ttft_p50", "ttft_p95", "ttft_p99"]],
  ["Inter-token latency (s)", ["itl_p50", "itl_p95", "itl_p99"]],
  ["Tokens/s", ["tokens_in", "tokens_out"]],
  ["Replicas", ["replicas_desired", "replicas_ready", "replicas_starting"]],
  ["Held queue depth", ["queue_depth"]],
  ["KV-cache use and prefix-cache hit rate", ["kv_cache_usage", "prefix_cache_hit_rate"]],
  ["Cold starts", ["cold_starts"]],
];
const COLORS = ["#2563eb", "#d97706", "#dc2626"];

function confirmations() {
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (e) => {
      if (!window.confirm(form.dataset.confirm)) e.preventDefault();
    });
  }
}

async function fetchText(url) {
  const r = await fetch(url, { credentials: "same-origin", headers: { accept: "text/html" } });
  if (r.redirected || !r.ok) throw new Error(`${url}: ${r.status}`);
  return r.text();
}

function polls() {
  for (const el of document.querySelectorAll("[data-poll]")) {
    setInterval(async () => {
      try { el.innerHTML = await fetchText(el.dataset.poll); } catch (e) { /* keep the last view */ }
    }, 2000);
  }
}

function logTail() {
  const pre = document.getElementById("log");
  const live = document.getElementById("live");
  if (!pre) return;
  setInterval(async () => {
    if (live && !live.checked) return;
    try {
      const body = JSON.parse(await fetchText(pre.dataset.lines));
      pre.textContent = body.lines.length ? body.lines.join("\n") : "No log lines yet.";
    } catch (e) { /* keep the last lines */ }
  }, 2000);
}

function summary(title, names, data) {
  const fmt = (x) => String(Number(x.toPrecision(3)));
  const parts = names.map((n) => {
    const v = data.series[n].filter((x) => x !== null);
    return v.length ? `${n} latest ${fmt(v[v.length - 1])} peak ${fmt(Math.max(...v))}` : `${n} no data`;
  });
  return `${title} over ${data.range}: ${parts.join("; ")}`;
}

function total(names, data) {
  let s = 0;
  for (const n of names) for (const v of data.series[n]) if (v !== null) s += v;
  return s;
}

function charts() {
  const root = document.getElementById("charts");
  if (!root || typeof uPlot === "undefined") return;
  const asked = new URLSearchParams(window.location.search).get("range");
  let range = asked && document.querySelector(`[data-range="${asked}"]`) ? asked : "15m";
  for (const o of document.querySelectorAll("[data-range]")) o.setAttribute("aria-pressed", String(o.dataset.range === range));
  const plots = new Map();

  function draw(data) {
    for (const [title, names] of CHARTS) {
      const rows = [data.t, ...names.map((n) => data.series[n])];
      let entry = plots.get(title);
      if (!entry) {
        const fig = document.createElement("figure");
        const cap = document.createElement("figcaption");
        cap.textContent = title;
        const box = document.createElement("div");
        box.setAttribute("role", "img");
        box.className = "chart";
        fig.append(cap, box);
        root.append(fig);
        const opts = {
          width: Math.max(280, Math.min(560, root.clientWidth / 2 - 24)), height: 180,
          series: [{}, ...names.map((n, i) => ({ label: n, stroke: COLORS[i % COLORS.length], width: 1.5,
                                                 spanGaps: false }))],
          axes: [{}, { size: 60 }],
        };
        entry = { box, plot: new uPlot(opts, rows, box) };
        plots.set(title, entry);
      } else {
        entry.plot.setData(rows);
      }
      entry.box.setAttribute("aria-label", summary(title, names, data));
      entry.box.dataset.total = String(total(names, data));
      entry.box.dataset.points = String(data.t.length);
    }
    if (!root.dataset.renderedMs) root.dataset.renderedMs = performance.now().toFixed(1);  // from navigation start
    root.dataset.loaded = String(Date.now());
  }

  async function load() {
    try {
      draw(JSON.parse(await fetchText(`${root.dataset.metrics}?range=${range}`)));
    } catch (e) { /* the next tick retries */ }
  }

  for (const b of document.querySelectorAll("[data-range]")) {
    b.addEventListener("click", () => {
      range = b.dataset.range;
      for (const o of document.querySelectorAll("[data-range]")) o.setAttribute("aria-pressed", String(o === b));
      load();
    });
  }
  load();
  setInterval(load, 5000);
}

document.addEventListener("DOMContentLoaded", () => {
  confirmations();
  polls();
  logTail();
  charts();
});
