// FedHL web view: reads the admin API's JSON (mounted under /ui/api behind the session
// cookie) and draws tables and SVG charts. Every value from the server is set as text,
// never parsed as HTML: agent names and errors come from outside.
"use strict";

const API = "/ui/api";
const SVGNS = "http://www.w3.org/2000/svg";
const PALETTE = ["#2f6fde", "#e0582b", "#1f9d55", "#9b51e0", "#c77c02", "#0fa3b1", "#d6336c", "#5c677d"];
const ENDED = ["COMPLETED", "CANCELLED", "FAILED"];
const ACTIVE_ROUND = ["OPEN", "COLLECTING", "AGGREGATING"];
const POLL_MS = { jobs: 5000, job: 3000, fleet: 5000 };

// -- small DOM helpers ------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) node.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) node.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function badge(text, cls) {
  return el("span", { class: `badge ${cls || text}` }, text);
}

function fmt(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  if (typeof value === "number" && !Number.isInteger(value)) return value.toFixed(digits);
  return String(value);
}

function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso.endsWith("Z") || iso.includes("+") ? iso : iso + "Z");
  return d.toISOString().replace("T", " ").slice(0, 19) + " UTC";
}

function ago(iso) {
  if (!iso) return "never";
  const d = new Date(iso.endsWith("Z") || iso.includes("+") ? iso : iso + "Z");
  const s = Math.max(0, Math.round((Date.now() - d.getTime()) / 1000));
  if (s < 90) return `${s} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

function seconds(r) {
  if (!r.committed_at) return null;
  return (new Date(r.committed_at) - new Date(r.created_at)) / 1000;
}

function table(columns, rows, attrs) {
  return el(
    "table",
    attrs,
    el("thead", {}, el("tr", {}, columns.map((c) => el("th", {}, c[0])))),
    el(
      "tbody",
      {},
      rows.map((row) =>
        el("tr", {}, columns.map((c) => {
          const v = c[1](row);
          return el("td", c[2] ? { class: c[2] } : {}, v);
        })),
      ),
    ),
  );
}

async function api(path) {
  const r = await fetch(API + path, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (r.status === 401) {
    window.location.assign("/ui/login?next=" + encodeURIComponent(window.location.pathname));
    throw new Error("session expired");
  }
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail; } catch (e) { /* not JSON */ }
    throw new Error(`${r.status}: ${detail}`);
  }
  return r.json();
}

// -- line chart -------------------------------------------------------------------------

function niceTicks(lo, hi, n = 5) {
  if (lo === hi) { lo -= 1; hi += 1; }
  const raw = (hi - lo) / n;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toFixed(10));
  return ticks;
}

// series: [{name, points: [[x, y], ...]}]; points with y null are skipped.
function lineChart(id, title, note, series, opts = {}) {
  const live = series.map((s) => ({ ...s, points: s.points.filter((p) => p[1] !== null && p[1] !== undefined && Number.isFinite(p[1])) }))
    .filter((s) => s.points.length > 0);
  const total = live.reduce((n, s) => n + s.points.length, 0);
  const box = el("div", { class: "chart", "data-chart": id, "data-points": total, "data-series": live.length },
    el("h3", {}, title), note ? el("p", { class: "note" }, note) : null);
  if (total === 0) {
    box.append(el("div", { class: "empty" }, opts.empty || "no data yet"));
    return box;
  }
  const W = 440, H = 200, L = 46, R = 12, T = 8, B = 26;
  const legendRows = Math.ceil(live.length / 4);
  const xs = live.flatMap((s) => s.points.map((p) => p[0]));
  const ys = live.flatMap((s) => s.points.map((p) => p[1]));
  let x0 = Math.min(...xs), x1 = Math.max(...xs);
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  let y0 = opts.yMin !== undefined ? opts.yMin : Math.min(...ys);
  let y1 = opts.yMax !== undefined ? opts.yMax : Math.max(...ys);
  const pad = (y1 - y0) * 0.08 || Math.abs(y1) * 0.1 || 1;
  if (opts.yMin === undefined) y0 -= pad;
  if (opts.yMax === undefined) y1 += pad;
  const yt = niceTicks(y0, y1, 4);
  y0 = Math.min(y0, yt[0]); y1 = Math.max(y1, yt[yt.length - 1]);
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H + legendRows * 16 + 4}`, role: "img", "aria-label": title });
  for (const t of yt) {
    root.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: sy(t), y2: sy(t) }));
    root.append(svg("text", { x: L - 6, y: sy(t) + 4, "text-anchor": "end" }, fmt(t, Math.abs(t) < 10 ? 2 : 0)));
  }
  const xStep = Math.max(1, Math.ceil((x1 - x0) / 10));
  for (let x = Math.ceil(x0); x <= x1; x += xStep) {
    root.append(svg("text", { x: sx(x), y: H - B + 16, "text-anchor": "middle" }, x));
  }
  root.append(svg("text", { x: W - R, y: H - 2, "text-anchor": "end" }, "round"));
  root.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  root.append(svg("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  live.forEach((s, i) => {
    const color = s.color || PALETTE[i % PALETTE.length];
    const pts = s.points.slice().sort((a, b) => a[0] - b[0]);
    const g = svg("g", { class: "series-group", "data-series": s.name });
    if (pts.length > 1) {
      g.append(svg("polyline", { class: "series", stroke: color, points: pts.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" ") }));
    }
    for (const p of pts) {
      g.append(svg("circle", { class: "pt", cx: sx(p[0]), cy: sy(p[1]), r: 3.2, fill: color },
        svg("title", {}, `${s.name} · round ${p[0]}: ${fmt(p[1], 4)}`)));
    }
    root.append(g);
    const lx = L + (i % 4) * ((W - L) / 4), ly = H + 10 + Math.floor(i / 4) * 16;
    root.append(svg("g", { class: "legend" },
      svg("rect", { x: lx, y: ly - 8, width: 10, height: 10, rx: 2, fill: color }),
      svg("text", { x: lx + 14, y: ly + 1 }, s.name.length > 18 ? s.name.slice(0, 17) + "…" : s.name)));
  });
  box.append(root);
  return box;
}

// -- pages ------------------------------------------------------------------------------

function setStatus(text, isError) {
  const s = document.getElementById("status");
  s.textContent = text;
  s.classList.toggle("error", !!isError);
}

function render(...nodes) {
  const main = document.getElementById("main");
  main.replaceChildren(...nodes.filter((n) => n !== null && n !== undefined));
  document.body.dataset.renders = String(Number(document.body.dataset.renders || 0) + 1);
}

async function jobsPage() {
  const jobs = await api("/jobs");
  const rows = table(
    [
      ["name", (j) => el("a", { href: `/ui/jobs/${encodeURIComponent(j.id)}` }, j.name)],
      ["status", (j) => badge(j.status)],
      ["strategy", (j) => j.strategy],
      ["rounds", (j) => `${j.current_round} / ${j.rounds}`, "num"],
      ["ranks", (j) => (j.config.rank_set || []).join(", ")],
      ["created", (j) => when(j.created_at)],
      ["id", (j) => el("code", {}, j.id)],
    ],
    jobs,
    { id: "jobs-table" },
  );
  render(el("h1", {}, "Jobs"), jobs.length ? rows : el("p", { class: "muted" }, "No jobs yet: fedhl jobs submit SPEC.yaml"));
  return true;
}

const roundCache = new Map(); // round id -> detail, for rounds that can no longer change

async function roundDetails(jobId, rounds) {
  const out = new Map();
  for (const r of rounds) {
    let d = roundCache.get(r.id);
    if (!d) {
      d = await api(`/jobs/${encodeURIComponent(jobId)}/rounds/${r.id}`);
      if (!ACTIVE_ROUND.includes(d.state) && d.state !== "PENDING") roundCache.set(r.id, d);
    }
    out.set(r.id, d);
  }
  return out;
}

function agentLabel(names, id) {
  return names.get(id) || id.slice(0, 8);
}

// A report's `dropped` / `clipped`: records per (agent, module), e.g. {client, module, reason};
// what the charts count is the agents hit, each once.
function records(v) {
  if (Array.isArray(v)) return v.map((d) => (d && typeof d === "object" ? d : { client: String(d) }));
  if (v && typeof v === "object") return Object.entries(v).map(([client, reason]) => ({ client, reason }));
  return [];
}

function agentsHit(v) {
  return [...new Set(records(v).map((d) => d.client))];
}

function hitText(names, v, what) {
  const by = new Map();
  for (const d of records(v)) {
    if (!by.has(d.client)) by.set(d.client, new Set());
    if (d.reason) by.get(d.client).add(d.reason);
  }
  return [...by.entries()]
    .map(([id, reasons]) => `${what} ${agentLabel(names, id)}${reasons.size ? ` (${[...reasons].join(", ")})` : ""}`)
    .join("; ");
}

async function jobPage() {
  const jobId = decodeURIComponent(window.location.pathname.split("/").pop());
  const [job, rounds, agents] = await Promise.all([
    api(`/jobs/${encodeURIComponent(jobId)}`),
    api(`/jobs/${encodeURIComponent(jobId)}/rounds`),
    api("/agents"),
  ]);
  const names = new Map(agents.map((a) => [a.id, a.name]));
  const details = await roundDetails(jobId, rounds);
  const committed = rounds.filter((r) => r.state === "COMMITTED" && r.report);
  const x = (r) => r.number + 1;
  const rep = (r) => r.report || {};
  const ev = (r) => rep(r).evaluation || {};

  const perAgent = (pick) => {
    const series = new Map();
    for (const r of committed) {
      for (const [id, v] of pick(r)) {
        if (!series.has(id)) series.set(id, { name: agentLabel(names, id), points: [] });
        series.get(id).points.push([x(r), v]);
      }
    }
    return [...series.values()].sort((a, b) => a.name.localeCompare(b.name));
  };
  const weights = perAgent((r) => Object.entries(rep(r).weights || {}));
  const ranks = perAgent((r) => (details.get(r.id)?.assignments || []).map((a) => [a.agent_id, a.rank]));
  const energy = new Map();
  for (const r of committed) {
    for (const [rank, v] of Object.entries(rep(r).energy_kept || {})) {
      if (!energy.has(rank)) energy.set(rank, { name: `rank ${rank}`, points: [] });
      energy.get(rank).points.push([x(r), v]);
    }
  }
  const hasDrops = committed.some((r) => "dropped" in rep(r) || "clipped" in rep(r));
  const expired = (r) => (details.get(r.id)?.assignments || []).filter((a) => a.state === "EXPIRED").length;
  const dropSeries = [{ name: "not uploaded", points: committed.map((r) => [x(r), expired(r)]) }];
  if (hasDrops) {
    dropSeries.push({ name: "dropped", points: committed.map((r) => [x(r), agentsHit(rep(r).dropped).length]) });
    dropSeries.push({ name: "clipped", points: committed.map((r) => [x(r), agentsHit(rep(r).clipped).length]) });
  }

  const hasEval = committed.some((r) => ev(r).accuracy !== undefined || ev(r).loss !== undefined);
  const charts = el("div", { class: "charts" },
    lineChart("accuracy", "Held-out accuracy", "aggregator's evaluation of the global model",
      [{ name: "accuracy", points: committed.map((r) => [x(r), ev(r).accuracy ?? null]) }],
      { yMin: 0, yMax: 1, empty: hasEval ? "no data yet" : "this job has no evaluation split" }),
    lineChart("loss", "Held-out loss", null,
      [{ name: "loss", points: committed.map((r) => [x(r), ev(r).loss ?? null]) }],
      { empty: hasEval ? "no data yet" : "this job has no evaluation split" }),
    lineChart("weights", "Aggregation weight per agent", "share of the round's update (sums to 1)", weights, { yMin: 0 }),
    lineChart("ranks", "Assigned LoRA rank per agent", null, ranks, { yMin: 0 }),
    lineChart("energy", "Energy kept by rank-r truncation", "fraction of the global update's energy each rank's start point keeps", [...energy.values()], { yMin: 0, yMax: 1 }),
    lineChart("neff", "Effective number of agents (N_eff)", "1 / Σ wᵢ²", [{ name: "N_eff", points: committed.map((r) => [x(r), rep(r).n_eff ?? null]) }], { yMin: 0 }),
    lineChart("drops", "Uploads dropped or clipped", hasDrops ? "agents per round" : "expired assignments; the reports record no drops or clips", dropSeries, { yMin: 0 }),
  );

  const roundRows = table(
    [
      ["round", (r) => (r.attempt ? `${x(r)} (try ${r.attempt + 1})` : x(r)), "num"],
      ["state", (r) => badge(r.state)],
      ["uploads", (r) => {
        const d = details.get(r.id);
        const up = d ? d.assignments.filter((a) => a.state === "UPLOADED").length : "—";
        return `${up} / ${r.target}`;
      }, "num"],
      ["accuracy", (r) => fmt(ev(r).accuracy), "num"],
      ["loss", (r) => fmt(ev(r).loss), "num"],
      ["N_eff", (r) => fmt(rep(r).n_eff, 2), "num"],
      ["‖ΔW‖", (r) => fmt(rep(r).global_update_norm, 4), "num"],
      ["aggregation s", (r) => fmt((rep(r).timings || {}).total_s, 2), "num"],
      ["round s", (r) => fmt(seconds(r), 1), "num"],
      ["ranks (agent: r)", (r) => (details.get(r.id)?.assignments || [])
        .map((a) => `${agentLabel(names, a.agent_id)}: ${a.rank}`).sort().join(", ")],
      ["dropped / clipped", (r) => [hitText(names, rep(r).dropped, "dropped"), hitText(names, rep(r).clipped, "clipped")]
        .filter(Boolean).join("; ")],
      ["error", (r) => r.error || ""],
    ],
    rounds.slice().reverse(),
    { id: "rounds-table" },
  );

  const facts = el("div", { class: "facts card" },
    [["status", badge(job.status)], ["strategy", job.strategy], ["rounds", `${job.current_round} of ${job.rounds} committed`],
      ["rank set", (job.config.rank_set || []).join(", ")], ["rank policy", (job.config.rank_policy || {}).kind || "—"],
      ["base model", job.config.base_model], ["created", when(job.created_at)], ["id", el("code", {}, job.id)]]
      .map(([k, v]) => el("div", {}, el("span", {}, k), v)));
  render(
    el("h1", {}, job.name),
    facts,
    job.error ? el("p", { class: "error" }, job.error) : null,
    el("h2", {}, "Charts"),
    charts,
    el("h2", {}, "Rounds"),
    rounds.length ? roundRows : el("p", { class: "muted" }, "No round has opened yet."),
  );
  return !ENDED.includes(job.status);
}

async function fleetPage() {
  const [agents, jobs] = await Promise.all([api("/agents"), api("/jobs")]);
  // Each agent's latest assignment, from the latest round of the most recent jobs.
  const assigned = new Map();
  for (const job of jobs.slice(0, 5)) {
    const rounds = await api(`/jobs/${encodeURIComponent(job.id)}/rounds`);
    const last = rounds[rounds.length - 1];
    if (!last) continue;
    const d = await api(`/jobs/${encodeURIComponent(job.id)}/rounds/${last.id}`);
    for (const a of d.assignments) {
      const prev = assigned.get(a.agent_id);
      if (!prev || prev.at < d.created_at) assigned.set(a.agent_id, { rank: a.rank, job: job.name, round: d.number + 1, at: d.created_at });
    }
  }
  const quarantine = (a) => a.quarantined_until || a.quarantine || a.quarantined;
  const hasQuarantine = agents.some((a) => "quarantined_until" in a || "quarantine" in a || "quarantined" in a);
  const columns = [
    ["name", (a) => a.name],
    ["status", (a) => badge(a.status)],
    ["alive", (a) => (a.alive ? badge("alive", "alive") : badge("gone", "gone"))],
    ["last seen", (a) => el("span", { title: when(a.last_seen_at) }, ago(a.last_seen_at))],
    ["device", (a) => {
      const r = a.resources || {};
      return r.device_name ? `${r.device_type || "?"} · ${r.device_name}` : r.device_type || "—";
    }],
    ["memory", (a) => {
      const m = (a.resources || {}).device_memory_bytes;
      return m ? `${(m / 2 ** 30).toFixed(1)} GiB` : "—";
    }, "num"],
    ["assigned rank", (a) => {
      const s = assigned.get(a.id);
      return s ? `${s.rank} (${s.job}, round ${s.round})` : "—";
    }],
    ["rank override", (a) => (a.rank_override === null ? "—" : String(a.rank_override)), "num"],
  ];
  if (hasQuarantine) columns.push(["quarantine", (a) => (quarantine(a) ? badge(String(quarantine(a)), "quarantined") : "—")]);
  columns.push(["id", (a) => el("code", {}, a.id)]);
  const alive = agents.filter((a) => a.alive).length;
  render(
    el("h1", {}, "Fleet"),
    el("p", { class: "muted" }, `${agents.length} agents enrolled, ${alive} alive`),
    agents.length ? table(columns, agents, { id: "fleet-table" }) : el("p", { class: "muted" }, "No agent has enrolled yet."),
  );
  return true;
}

const PAGES = { jobs: jobsPage, job: jobPage, fleet: fleetPage };

async function tick() {
  const page = document.body.dataset.page;
  let again = true;
  try {
    again = await PAGES[page]();
    setStatus(`updated ${new Date().toLocaleTimeString()}${again ? "" : " · job ended"}`);
  } catch (e) {
    setStatus(`update failed: ${e.message}`, true);
  }
  if (again) window.setTimeout(tick, POLL_MS[page]);
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  const nav = document.querySelector(`[data-nav="${page === "job" ? "jobs" : page}"]`);
  if (nav) nav.classList.add("active");
  tick();
});
