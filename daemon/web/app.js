// ckpt-daemon dashboard: fetches /api/dashboard and draws it with plain DOM and SVG.
// Every string from the server (checkpoint names, reasons, trainer output) is untrusted: it only ever
// becomes a text node or an attribute value, never markup (no innerHTML anywhere).
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";
const REFRESH_MS = 15000;

// ------------------------------------------------------------------------------ DOM helpers
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v; else e.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function sv(tag, attrs, title) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) e.setAttribute(k, String(v));
  }
  if (title) {
    const t = document.createElementNS(SVGNS, "title");
    t.textContent = title;
    e.append(t);
  }
  return e;
}

function svgText(x, y, text, attrs) {
  const t = sv("text", Object.assign({ x, y }, attrs || {}));
  t.textContent = text;
  return t;
}

// ------------------------------------------------------------------------------ formatting
function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0, v = Number(n);
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return i === 0 ? `${v.toFixed(0)} B` : `${v.toFixed(1)} ${units[i]}`;
}

function shortBytes(n) { return bytes(n).replace(/\.0 /, " "); }

function age(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  const s = Math.max(0, seconds);
  if (s >= 86400) return `${(s / 86400).toFixed(1)}d`;
  if (s >= 3600) return `${(s / 3600).toFixed(1)}h`;
  if (s >= 60) return `${(s / 60).toFixed(1)}m`;
  return `${s.toFixed(0)}s`;
}

function when(t) {
  if (t === null || t === undefined) return "–";
  const d = typeof t === "string" ? new Date(t) : new Date(t * 1000);
  return isNaN(d) ? String(t) : d.toLocaleString();
}

function ago(now, t) { return t ? `${age(now - t)} ago` : "–"; }

function num(v, digits) {
  if (v === null || v === undefined) return "–";
  return typeof v === "number" ? v.toLocaleString(undefined, { maximumFractionDigits: digits ?? 3 }) : String(v);
}

function niceTicks(lo, hi, n) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) out.push(v);
  return out;
}

function shortNum(v) {
  const a = Math.abs(v);
  if (a >= 1e9) return `${+(v / 1e9).toFixed(1)}G`;
  if (a >= 1e6) return `${+(v / 1e6).toFixed(1)}M`;
  if (a >= 1e4) return `${+(v / 1e3).toFixed(1)}k`;
  return `${+v.toFixed(4)}`;
}

// Ticks for a byte axis: round numbers in the unit that fits (0, 100 GiB, 200 GiB...).
function byteTicks(lo, hi, n) {
  let unit = 1;
  while (hi / unit >= 1024 && unit < 1024 ** 5) unit *= 1024;
  return niceTicks(lo / unit, hi / unit, n).map(v => v * unit);
}

// Ticks for a time axis (Unix seconds): whole minutes, hours or days in local time.
function timeTicks(lo, hi, count) {
  const steps = [60, 300, 600, 1800, 3600, 7200, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 2 * 86400, 7 * 86400, 30 * 86400];
  const step = steps.find(s => (hi - lo) / s <= count) || steps[steps.length - 1];
  const tz = new Date(lo * 1000).getTimezoneOffset() * 60;
  const out = [];
  for (let t = Math.ceil((lo - tz) / step) * step + tz; t <= hi; t += step) out.push(t);
  return out;
}

function timeLabel(t, span) {
  const d = new Date(t * 1000);
  if (span <= 36 * 3600) return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  return d.toLocaleString([], { month: "short", day: "numeric", hour: span <= 8 * 86400 ? "2-digit" : undefined });
}

function widthOf(node) { return Math.max(480, Math.floor(node.getBoundingClientRect().width) || 900); }

// ------------------------------------------------------------------------------ summary cards
function card(title, rows, extra) {
  const dl = el("dl");
  for (const [k, v, cls] of rows) dl.append(el("dt", {}, k), el("dd", { class: cls }, v));
  return el("div", { class: "card" }, el("h2", {}, title), dl, extra || null);
}

function drawCards(d) {
  const now = d.now, t = d.training || {}, ck = d.checkpoints || {}, disk = (d.disk || {}).now || {};
  const ret = d.retention || {}, lc = d.last_cleanup;
  const runs = d.runs || [];
  const planned = runs.reduce((a, r) => a + r.planned_deletions, 0);
  const plannedBytes = runs.reduce((a, r) => a + r.planned_free_bytes, 0);
  const held = runs.reduce((a, r) => a + r.held.length, 0);
  const stateCls = { running: "ok", adopted: "ok", gave_up: "bad", backoff: "warn" }[t.state] || "";
  const trainingRows = [
    ["state", t.state || "–", stateCls],
    ["pid", t.pid ?? "–"],
    ["step", num(t.step, 0)],
    ["speed", t.steps_per_s ? `${num(t.steps_per_s, 2)} steps/s` : "–"],
    ["restarts", num(t.restarts ?? 0, 0)],
    ["resumed from", t.resumed_from || "scratch"],
    ["heartbeat", ago(now, t.heartbeat_time)],
  ];
  const dev = t.device;
  if (dev && typeof dev.device === "string") {
    const m = dev.memory || {};
    const parts = ["allocated", "reserved"].filter((k) => typeof m[k] === "number").map((k) => `${bytes(m[k])} ${k}`);
    if (typeof m.total === "number") parts.push(`${bytes(m.total)} total`);
    if (typeof m.rss === "number") parts.push(`${bytes(m.rss)} resident`);
    trainingRows.push(["device", `${dev.device}${dev.name ? ` (${dev.name})` : ""}${dev.precision ? `, ${dev.precision}` : ""}`]);
    if (parts.length) trainingRows.push(["device memory", parts.join(" / ")]);
  }
  if ((t.recent_crashes || 0) >= 2) trainingRows.push(["crash loop", `${t.recent_crashes} crashes within ${num((t.crash_window_s || 0) / 60, 0)} min`, "bad"]);
  for (const [name, m] of Object.entries(t.metrics || {}).slice(0, 6)) {
    if (m && typeof m.value === "number") trainingRows.push([name, `${m.value.toPrecision(4)}${m.step !== null && m.step !== undefined ? ` at step ${m.step}` : ""}`]);
  }
  if (t.message) trainingRows.push(["note", t.message, t.state === "gave_up" ? "bad" : ""]);
  const latest = ck.latest, best = ck.best;
  const failed = Object.entries(ck.failed_verification || {});
  const ckRows = [
    ["count", `${num(ck.count, 0)} (${num(ck.valid, 0)} valid)`],
    ["latest", latest ? `${latest.name} · ${ago(now, latest.mtime)}` : "none"],
    ["best", best ? `${best.name}${metricText(best.metrics)}` : "none"],
    ["quarantined", num(ck.quarantined ?? 0, 0), ck.quarantined ? "warn" : ""],
    ["failed checks", failed.length ? failed.map(([n, why]) => `${n}: ${why}`).join("; ") : "none", failed.length ? "bad" : ""],
  ];
  const levelCls = { ok: "ok", warning: "warn", emergency: "bad" }[disk.level] || "";
  const diskRows = [
    ["free", disk.free_bytes !== undefined ? bytes(disk.free_bytes) : "–", levelCls],
    ["total", bytes(disk.total_bytes)],
    ["used", disk.used_percent !== undefined && disk.used_percent !== null ? `${disk.used_percent}% (as df shows it)` : "–"],
    ["filesystem", disk.mount || "–"],
    ["level", disk.level || "–", levelCls],
    ["checked", ago(now, disk.checked)],
  ];
  if (disk.message) diskRows.push(["note", disk.message, "bad"]);
  const retRows = [
    ["scheduled", ret.enabled === false ? "disabled: the daemon deletes nothing" : "enabled", ret.enabled === false ? "warn" : ""],
    ["policy", ret.policy_confirmed === false ? "edited, not confirmed yet" : "confirmed", ret.policy_confirmed === false ? "warn" : ""],
    ["next cleanup", `${planned} to delete, frees ${bytes(plannedBytes)}`, planned ? "warn" : ""],
    ["held", held ? `${held} (unconfirmed policy)` : "none", held ? "warn" : ""],
    ["last cleanup", lc ? `${ago(now, lc.time)}: deleted ${lc.deleted}, freed ${bytes(lc.freed_bytes)}` : "never"],
  ];
  const daemon = d.daemon || {};
  const box = document.getElementById("cards");
  const cards = [card("Training", trainingRows), card("Checkpoints", ckRows), card("Disk", diskRows), card("Retention", retRows)];
  const mem = d.memory;
  if (mem) {
    const newest = mem.newest || {}, lp = mem.last_persist || {}, pinned = mem.pinned_steps || [];
    cards.push(card("Memory checkpoints", mem.error ? [["off", mem.error, "bad"]] : [
      ["state", mem.active ? "active" : "closed (the daemon stopped)", mem.active ? "ok" : ""],
      ["newest slot", newest.step !== undefined && newest.step !== null ? `step ${newest.step} · ${bytes(newest.bytes)} · ${ago(now, newest.time)}` : "none yet"],
      ["persisted", lp.step !== undefined && lp.step !== null ? `up to step ${lp.step} (${num(mem.persisted, 0)} persists)` : "none by this daemon yet"],
      ["pinned", pinned.length ? pinned.map(x => `step ${x}`).join(", ") : "nothing"],
    ]));
  }
  for (const r of d.replicas || []) {  // off-machine replicas (replicas: in config.yaml)
    const behind = r.behind_since ? now - r.behind_since : 0, late = r.within_s && behind > r.within_s;
    const rows = [
      ["replicas", `${num(r.replicas ?? 0, 0)}${r.newest ? ` · newest ${r.newest.name}` : ""}`],
      ["lag", behind ? `${num(r.lag_steps ?? 0, 0)} steps · ${age(behind)} · ${bytes(r.bytes_pending || 0)} pending` : "up to date", late ? "bad" : ""],
      ["last success", ago(now, r.last_success)],
    ];
    if (r.uploading) rows.push(["uploading", `${r.uploading.name}: ${bytes(r.uploading.done || 0)} of ${bytes(r.uploading.total || 0)}`]);
    if (r.last_error) rows.push(["last error", r.last_error.message, "warn"]);
    for (const [n, why] of Object.entries(r.damaged || {})) rows.push(["damaged", `${n}: ${why}`, "bad"]);
    cards.push(card(`Replica ${r.url}`, rows));
  }
  if (daemon.config_error || daemon.config_pending) {
    cards.push(card("Config", [["not in force", daemon.config_error || daemon.config_pending, "bad"]]));
  }
  box.replaceChildren(...cards);
}

function metricText(m) {
  const parts = Object.entries(m || {}).slice(0, 3).map(([k, v]) => `${k} ${typeof v === "number" ? v.toPrecision(4) : v}`);
  return parts.length ? ` (${parts.join(", ")})` : "";
}

// ------------------------------------------------------------------------------ timeline
function markTitle(c) {
  const lines = [`${c.name} — step ${c.step}`, `${c.status}${c.reason ? ": " + c.reason : ""} · ${bytes(c.bytes)}`];
  if (c.mtime) lines.push(`written ${when(c.mtime)}`);
  const flags = [];
  if (c.latest) flags.push("latest");
  if (c.best) flags.push("best");
  if (c.resumed_from) flags.push("training resumed from it");
  if (c.pin) flags.push(`pinned: ${c.pin}`);
  if (c.epoch_end) flags.push(`end of epoch ${c.epoch}`);
  if (c.snapshots && c.snapshots.length) flags.push(`in snapshots ${c.snapshots.join(", ")}`);
  if (flags.length) lines.push(flags.join(" · "));
  const m = metricText(c.metrics);
  if (m) lines.push(`metrics${m}`);
  lines.push((c.keep ? (c.held ? "HELD (kept for now): " : "keep: ") : "NEXT CLEANUP DELETES IT: ") + (c.reasons || []).join("; "));
  return lines.join("\n");
}

function markClass(c) {
  if (c.status !== "complete") return "bad";
  if (!c.keep) return "delete";
  if (c.held) return "held";
  return "keep";
}

function drawTimeline(run, box) {
  // rows, top to bottom: band labels, flags (stacked above their mark), marks, epoch ends, axis, snapshots
  const W = widthOf(box), H = 186, L = 40, R = 16;
  const labelY = 13, flagY = 60, markTop = 66, base = 118, axisY = 134, snapY = 156;
  const s = sv("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-label": `checkpoint timeline of ${run.run || "the checkpoint folder"}` });
  const cks = run.checkpoints, only = run.in_snapshots_only || [];
  const steps = cks.map(c => c.step).concat(only.map(c => c.step));
  if (!steps.length) {
    s.append(svgText(L, 60, "No checkpoints yet."));
    return s;
  }
  let lo = Math.min(...steps), hi = Math.max(...steps);
  if (hi === lo) { lo -= 1; hi += 1; }
  const pad = (hi - lo) * 0.02;
  lo -= pad; hi += pad;
  const x = v => L + (v - lo) / (hi - lo) * (W - L - R);
  // tier bands, oldest (highest tier) on the left; boundaries half-way between neighbouring tiers
  const tiers = [...run.tiers].sort((a, b) => a.from_step - b.from_step);
  tiers.forEach((t, i) => {
    const left = i === 0 ? L : (x(tiers[i - 1].to_step) + x(t.from_step)) / 2;
    const right = i === tiers.length - 1 ? W - R : (x(t.to_step) + x(tiers[i + 1].from_step)) / 2;
    s.append(sv("rect", { x: left, y: 0, width: Math.max(1, right - left), height: axisY, class: `band t${((t.tier - 1) % 5) + 1}` },
      `${t.description}: ${t.count} checkpoint(s), steps ${t.from_step}–${t.to_step}`));
    const label = t.description.replace(/^tier (\d+) \((.*)\)$/, "tier $1: $2");
    if (right - left > 70) s.append(svgText(left + 4, labelY, right - left > label.length * 6 ? label : `tier ${t.tier}`, { class: "band-label" }));
  });
  // axis
  s.append(sv("line", { x1: L, x2: W - R, y1: axisY, y2: axisY, class: "axis" }));
  for (const v of niceTicks(lo, hi, Math.max(2, Math.floor(W / 110)))) {
    s.append(sv("line", { x1: x(v), x2: x(v), y1: axisY, y2: axisY + 4, class: "axis" }));
    s.append(svgText(x(v), axisY + 16, shortNum(v), { "text-anchor": "middle" }));
  }
  s.append(svgText(W - R, H - 4, "step", { "text-anchor": "end" }));
  // one mark per checkpoint: kept (tier colour), planned deletion (red, with an x), held, not complete
  const w = Math.max(2, Math.min(8, (W - L - R) / Math.max(1, cks.length) * 0.6));
  const g = sv("g", { class: "marks" });
  for (const c of cks) {
    const cx = x(c.step), cls = markClass(c);
    g.append(sv("rect", { x: cx - w / 2, y: markTop, width: w, height: base - markTop, class: `ckpt ${cls}`, "data-name": c.name, "data-step": c.step }, markTitle(c)));
    let fy = flagY;
    const next = () => { const y = fy; fy -= 11; return y; };
    if (cls === "delete") { const y = next(); g.append(sv("path", { d: `M${cx - 4} ${y - 4}l8 8m0 -8l-8 8`, class: "x" }, `${c.name}: the next cleanup deletes it: ${(c.reasons || []).join("; ")}`)); }
    if (c.best) g.append(sv("path", { d: star(cx, next(), 6), class: "flag best" }, `${c.name}: best${metricText(c.metrics)}`));
    if (c.latest) { const y = next(); g.append(sv("path", { d: `M${cx} ${y + 5}l-5 -9h10z`, class: "flag latest" }, `${c.name}: latest`)); }
    if (c.pin) g.append(sv("circle", { cx, cy: next(), r: 4, class: "flag pin" }, `${c.name}: pinned (${c.pin})`));
    if (c.epoch_end) g.append(sv("path", { d: `M${cx} ${base + 2}l5 5l-5 5l-5 -5z`, class: "flag epoch" }, `${c.name}: last checkpoint of epoch ${c.epoch}`));
    if (c.snapshots && c.snapshots.length) g.append(sv("rect", { x: cx - 4, y: snapY, width: 8, height: 8, class: "flag snap" }, `${c.name} is in snapshot(s) ${c.snapshots.join(", ")}`));
  }
  for (const c of only) {
    g.append(sv("rect", { x: x(c.step) - 4, y: snapY, width: 8, height: 8, class: "flag snap-only" },
      `${c.name} (step ${c.step}): no longer in the folder; kept in snapshot(s) ${c.snapshots.join(", ")}`));
  }
  s.append(g);
  return s;
}

function star(cx, cy, r) {
  let d = "";
  for (let i = 0; i < 10; i++) {
    const a = -Math.PI / 2 + i * Math.PI / 5, rr = i % 2 ? r * 0.45 : r;
    d += `${i ? "L" : "M"}${(cx + rr * Math.cos(a)).toFixed(1)} ${(cy + rr * Math.sin(a)).toFixed(1)}`;
  }
  return d + "Z";
}

function legend() {
  return el("div", { class: "legend" },
    el("span", { class: "l-keep" }, "kept"), el("span", { class: "l-delete" }, "next cleanup deletes"),
    el("span", { class: "l-held" }, "held (unconfirmed policy)"), el("span", { class: "l-bad" }, "not complete"),
    el("span", { class: "l-best" }, "best"), el("span", { class: "l-latest" }, "latest"), el("span", { class: "l-pin" }, "pinned"),
    el("span", { class: "l-epoch" }, "epoch end"), el("span", { class: "l-snap" }, "in a snapshot (hollow: only there)"),
    el("span", {}, "bands: retention tiers · hover a mark for its reasons"));
}

// A refresh redraws everything: the <details> a reader opened stay open (matched by data-key).
function openKeys() {
  return new Set([...document.querySelectorAll("details[data-key][open]")].map(e => e.dataset.key));
}

function details(key, open, summary, ...body) {
  return el("details", { "data-key": key, open: open.has(key) ? "" : null }, el("summary", {}, summary), ...body);
}

function drawRuns(d) {
  const box = document.getElementById("runs");
  const open = openKeys();
  const inv = d.inventory || {};
  const sections = [];
  if (!d.runs.length) {
    sections.push(el("div", { class: "run" }, el("h2", {}, "Checkpoints"),
      el("p", { class: "muted" }, inv.error ? `The catalog is not available: ${inv.error}` : "Reading the checkpoint folder…")));
  }
  for (const run of d.runs) {
    const title = run.run ? `Run ${run.run}` : "Checkpoints";
    const summary = `${run.count} checkpoint(s), ${run.valid} valid · latest ${run.latest || "none"} · best ${run.best || "none"}` +
      ` · next cleanup deletes ${run.planned_deletions} (frees ${bytes(run.planned_free_bytes)})` +
      (run.held.length ? ` · ${run.held.length} held` : "") + (run.left_out ? ` · ${run.left_out} oldest not drawn` : "");
    const tl = el("div", { class: "timeline" });
    const sec = el("section", { class: "run", "data-run": run.run, "data-count": run.count, "data-planned": run.planned_deletions },
      el("h2", {}, title), el("p", { class: "muted" }, summary),
      run.error ? el("p", { class: "err" }, run.error) : null,
      run.training_active ? el("p", { class: "muted" }, `Training is active: ${run.training_detail}`) : null,
      tl, legend());
    sections.push(sec);
    // planned deletions with their reasons
    const victims = run.checkpoints.filter(c => !c.keep);
    const rows = victims.slice().reverse().map(c => el("tr", { class: "planned", "data-name": c.name },
      el("td", {}, c.name), el("td", { class: "num" }, num(c.step, 0)), el("td", { class: "num" }, c.tier ?? "–"),
      el("td", { class: "num" }, bytes(c.freeable)), el("td", {}, (c.reasons || []).join("; "))));
    sec.append(details(`${run.run}/planned`, open, `What the next cleanup would delete (${victims.length})`,
      victims.length ? el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "checkpoint"), el("th", { class: "num" }, "step"),
        el("th", { class: "num" }, "tier"), el("th", { class: "num" }, "frees"), el("th", {}, "why"))), el("tbody", {}, rows))
        : el("p", { class: "muted" }, "Nothing: every checkpoint is kept by a tier or protected.")));
    const heldRows = run.checkpoints.filter(c => c.held);
    if (heldRows.length) {
      sec.append(details(`${run.run}/held`, open, `Held by the policy guard (${heldRows.length})`,
        el("table", {}, el("tbody", {}, heldRows.map(c => el("tr", { class: "held" }, el("td", {}, c.name), el("td", {}, (c.reasons || []).join("; "))))))));
    }
    const oddities = [].concat(
      (run.ignored || []).map(i => el("tr", { class: "ignored" }, el("td", {}, i.name), el("td", {}, `not a checkpoint: ${i.why}`))),
      (run.in_progress || []).map(n => el("tr", {}, el("td", {}, n), el("td", {}, "being written (or left by an interrupted save)"))),
      run.checkpoints.filter(c => c.status !== "complete").map(c => el("tr", {}, el("td", {}, c.name), el("td", {}, `${c.status}: ${c.reason}`))));
    if (oddities.length) {
      sec.append(details(`${run.run}/other`, open, `Other entries in the folder (${oddities.length})`, el("table", {}, el("tbody", {}, oddities))));
    }
    if (run.tiers.length) {
      sec.append(details(`${run.run}/tiers`, open, "Retention tiers", el("table", {}, el("tbody", {},
        run.tiers.map(t => el("tr", {}, el("td", {}, t.description), el("td", { class: "num" }, `${t.count} checkpoint(s)`),
          el("td", { class: "num" }, `steps ${t.from_step}–${t.to_step}`)))))));
    }
    sec._draw = () => tl.replaceChildren(drawTimeline(run, tl));
  }
  box.replaceChildren(...sections);
  for (const sec of sections) if (sec._draw) sec._draw();
}

// ------------------------------------------------------------------------------ line charts
function lineChart(box, series, opts) {
  const W = widthOf(box), H = 230, L = 58, R = 14, T = 12, B = 34;
  const s = sv("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-label": opts.label });
  const pts = series.flatMap(sr => sr.points);
  if (!pts.length) {
    s.append(svgText(L, 40, opts.empty));
    return s;
  }
  let x0 = Math.min(...pts.map(p => p[0])), x1 = Math.max(...pts.map(p => p[0]));
  let y0 = opts.yZero ? 0 : Math.min(...pts.map(p => p[1])), y1 = Math.max(...pts.map(p => p[1]));
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const yPad = (y1 - y0) * 0.05;
  if (!opts.yZero) y0 -= yPad;
  y1 += yPad;
  const x = v => L + (v - x0) / (x1 - x0) * (W - L - R);
  const y = v => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
  for (const v of (opts.yTicks || niceTicks)(y0, y1, 4)) {
    s.append(sv("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "axis" }));
    s.append(svgText(L - 6, y(v) + 4, opts.yFmt(v), { "text-anchor": "end" }));
  }
  for (const v of (opts.xTicks ? opts.xTicks(x0, x1, W) : niceTicks(x0, x1, Math.max(2, Math.floor(W / 110))))) {
    const anchor = x(v) > W - R - 30 ? "end" : (x(v) < L + 30 ? "start" : "middle");  // never cut at an edge
    s.append(svgText(x(v), H - B + 16, opts.xFmt(v), { "text-anchor": anchor }));
  }
  s.append(sv("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
  if (opts.xLabel) s.append(svgText(W - R, H - 2, opts.xLabel, { "text-anchor": "end" }));
  for (const sr of series) {
    if (!sr.points.length) continue;
    const d = sr.points.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)} ${y(p[1]).toFixed(1)}`).join("");
    if (sr.area) {
      s.append(sv("path", { d: `${d}L${x(sr.points[sr.points.length - 1][0]).toFixed(1)} ${y(y0)}L${x(sr.points[0][0]).toFixed(1)} ${y(y0)}Z`, class: sr.cls }, sr.name));
    } else {
      s.append(sv("path", { d, class: sr.cls }, sr.name));
    }
    if (sr.dots && sr.points.length <= 200) {
      for (const p of sr.points) s.append(sv("circle", { cx: x(p[0]), cy: y(p[1]), r: 2.5, class: sr.dots }, `${sr.name} at ${opts.xFmt(p[0])}: ${opts.yFmt(p[1])}`));
    }
  }
  const lg = el("div", { class: "legend" }, series.filter(sr => sr.points.length).map(sr => el("span", { class: sr.legend }, sr.name)));
  return [s, lg];
}

function drawLoss(d) {
  const box = document.getElementById("loss"), c = d.curve || {};
  const out = lineChart(box, [
    { name: "loss", points: c.loss || [], cls: "loss", legend: "l-loss" },
    { name: "val_loss", points: c.val_loss || [], cls: "val", dots: "val-dot", legend: "l-val" },
  ], { label: "loss by step", empty: "No metrics in logs/metrics.jsonl yet.", xFmt: shortNum, yFmt: v => shortNum(v), xLabel: "step" });
  box.replaceChildren(...[].concat(out), c.sampled_past ? el("p", { class: "muted" }, "Long history: older steps are sampled.") : "");
}

function drawDisk(d) {
  const box = document.getElementById("disk"), h = ((d.disk || {}).history) || [];
  // as df shows it: used, and what can be used (used + available; the blocks reserved for root are neither)
  const used = h.filter(p => p.total).map(p => [p.t, p.used ?? p.total - p.free]);
  const total = h.filter(p => p.total).map(p => [p.t, p.used !== undefined ? p.used + p.free : p.total]);
  const ck = h.filter(p => p.ckpt !== undefined).map(p => [p.t, p.ckpt]);
  const out = lineChart(box, [
    { name: "used", points: used, cls: "used", area: true, legend: "l-loss" },
    { name: "usable size (used + available)", points: total, cls: "total", legend: "l-total" },
    { name: "checkpoints", points: ck, cls: "ckpt-bytes", legend: "l-val" },
  ], {
    label: "disk use over time", empty: "No disk samples yet (one every 2 minutes).", yZero: true, yFmt: shortBytes,
    yTicks: byteTicks, xTicks: (a, b, W) => timeTicks(a, b, Math.max(2, Math.floor(W / 100))),
    xFmt: t => timeLabel(t, h.length ? h[h.length - 1].t - h[0].t : 0),
  });
  box.replaceChildren(...[].concat(out));
}

// ------------------------------------------------------------------------------ tables
function drawJobs(d) {
  const now = d.now;
  const rows = (d.jobs || []).map(j => el("tr", {},
    el("td", {}, j.job), el("td", {}, j.next ? when(j.next) : "not scheduled"),
    el("td", { class: j.last_result === "error" ? "bad" : (j.last_result === "ok" ? "ok" : "") }, j.last_result ? `${j.last_result} ${ago(now, j.last_attempt)}` : "never ran"),
    el("td", { class: "num" }, j.last_duration_s !== null && j.last_duration_s !== undefined ? `${num(j.last_duration_s, 2)} s` : "–"),
    el("td", {}, j.last_message || "")));
  document.getElementById("jobs").replaceChildren(rows.length ? el("table", {},
    el("thead", {}, el("tr", {}, el("th", {}, "job"), el("th", {}, "next"), el("th", {}, "last"), el("th", { class: "num" }, "took"), el("th", {}, "result"))),
    el("tbody", {}, rows)) : el("p", { class: "muted" }, "No jobs scheduled."));
}

function drawCrashes(d) {
  const now = d.now, box = document.getElementById("crashes");
  const cr = d.crashes || [];
  if (!cr.length) { box.replaceChildren(el("p", { class: "muted" }, "No crash since the daemon started.")); return; }
  box.replaceChildren(...cr.map(c => el("div", { class: "crash" },
    el("h3", {}, `${c.description || "crash"} · ${ago(now, c.time)}`),
    el("p", { class: "muted" }, `kind ${c.kind || "?"}, ran ${num(c.ran_s, 1)} s, from ${c.resumed_from || "scratch"}`),
    (c.tail && c.tail.length) ? el("pre", {}, c.tail.slice(-12).join("\n")) : null)));
}

function snapTime(now, s) {
  const created = s.created ? Date.parse(s.created) / 1000 : NaN;
  const t = isFinite(created) ? created : s.time;
  return t ? `${when(t)} (${ago(now, t)})` : "–";
}

function drawSnapshots(d) {
  const now = d.now, snaps = d.snapshots || [];
  const box = document.getElementById("snapshots");
  if (!snaps.length) { box.replaceChildren(el("p", { class: "muted" }, "No snapshots yet.")); return; }
  box.replaceChildren(el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "snapshot"), el("th", {}, "taken"), el("th", {}, "holds"), el("th", { class: "num" }, "added"))),
    el("tbody", {}, snaps.map(s => el("tr", {}, el("td", {}, s.name), el("td", {}, snapTime(now, s)),
      el("td", {}, s.checkpoints.map(c => `${c.run ? c.run + "/" : ""}${c.name} (${c.roles.join("/")})`).join(", ")),
      el("td", { class: "num" }, bytes(s.added_bytes)))))));
}

// ------------------------------------------------------------------------------ main loop
let last = null;

function draw(d) {
  const v = document.getElementById("verdict");
  v.className = `verdict ${d.verdict.level}`;
  v.textContent = d.verdict.line;
  document.getElementById("updated").textContent =
    `updated ${new Date(d.now * 1000).toLocaleTimeString()}` +
    (d.inventory && d.inventory.time ? ` · catalog and plan as of ${new Date(d.inventory.time * 1000).toLocaleTimeString()} (rebuilt every 30 s)` : "") +
    ` · ${(d.daemon || {}).config || ""}`;
  drawCards(d);
  drawRuns(d);
  drawLoss(d);
  drawDisk(d);
  drawJobs(d);
  drawCrashes(d);
  drawSnapshots(d);
  document.title = `${d.verdict.level === "ok" ? "" : "⚠ "}ckpt-daemon · ${d.verdict.line}`.slice(0, 120);
}

async function refresh() {
  try {
    const r = await fetch("/api/dashboard", { cache: "no-store", credentials: "same-origin" });
    if (r.status === 401) throw new Error("a token is needed: open this page as /?token=TOKEN (http.token in config.yaml)");
    if (!r.ok) throw new Error(`the daemon answered ${r.status}`);
    last = await r.json();
    draw(last);
    document.body.dataset.state = "ready";
  } catch (e) {
    const v = document.getElementById("verdict");
    v.className = "verdict bad";
    v.textContent = `Cannot reach the daemon: ${e.message}` + (last ? " (showing the last data it sent)" : "");
    if (!last) document.body.dataset.state = "error";
  }
}

let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => { if (last) draw(last); }, 200);
});
refresh();
setInterval(refresh, REFRESH_MS);
