"use strict";
// The dashboard: one page, hash routes, data from the JSON API, live
// updates from /api/events. Everything is built with DOM calls and
// textContent (no HTML from data), and served by the app (no CDN).

const $ = (id) => document.getElementById(id);
let me = null;
let refresh = null; // re-renders the current view on live events

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const fmt = (v, d = 3) => (v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(d));
const kib = (b) => (b === null || b === undefined ? "–" : b >= 1048576 ? `${(b / 1048576).toFixed(1)} MiB` : b >= 1024 ? `${(b / 1024).toFixed(1)} KiB` : `${b} bytes`);
const when = (ms) => new Date(ms).toLocaleString();

async function api(path, opts = {}) {
  const r = await fetch(path, { credentials: "same-origin", ...opts });
  if (r.status === 401) {
    location.href = "/login";
    throw new Error("signed out");
  }
  if (!r.ok) {
    const j = await r.json().catch(() => ({}));
    throw new Error(j.error || `${r.status}`);
  }
  return r.status === 204 ? null : r.json();
}

const can = (p) => me && me.permissions.includes(p);

// ---------------------------------------------------------------- charts

const COLORS = ["#1f6feb", "#c4320a", "#067647", "#7a5af8", "#dc6803", "#0e9384", "#c11574"];

// A line chart drawn by uPlot (vendored, served by the app): axes with
// ticks, gridlines, a legend under the plot that shows the hovered round's
// values, points on every round.
// series: [{name, points: [[x, y], ...], dash?}]; opts: {y0, y1, log}.
// The container carries the chart's id and, in data-points, how many
// values it plots (the browser test watches it grow).
function lineChart(id, title, series, opts = {}) {
  const box = el("div", { class: "chart", id });
  box.append(el("div", { class: "chart-title" }, title));
  const shown = (p) => p[1] !== null && p[1] !== undefined && Number.isFinite(p[1]) && (!opts.log || p[1] > 0);
  const pts = series.flatMap((s) => s.points).filter(shown);
  box.setAttribute("data-points", String(pts.length));
  if (pts.length === 0 || typeof uPlot === "undefined") {
    box.append(el("p", { class: "muted" }, pts.length ? "the chart library did not load" : "no data yet"));
    return box;
  }
  // uPlot takes one x array shared by every series: the union of rounds.
  const xs = [...new Set(pts.map((p) => p[0]))].sort((a, b) => a - b);
  const data = [xs, ...series.map((s) => {
    const at = new Map(s.points.filter(shown).map((p) => [p[0], p[1]]));
    return xs.map((x) => (at.has(x) ? at.get(x) : null));
  })];
  const y = opts.log ? { distr: 3 } : {};
  if (opts.y0 !== undefined && opts.y1 !== undefined && !opts.log) y.range = [opts.y0, opts.y1];
  // A fixed top (AUROC's 1) over a bottom that follows the data, in steps
  // of 0.05, so that small gains late in a run stay visible.
  else if (opts.y1 !== undefined && !opts.log) y.range = (u, min) => [Math.max(0, Math.floor((min - 0.01) * 20) / 20), opts.y1];
  const plot = new uPlot({
    width: 520,
    height: 240,
    scales: { x: { time: false }, y },
    axes: [
      { label: "round", incrs: [1, 2, 5, 10, 20, 50, 100], values: (u, v) => v.map((r) => String(r)) },
      {
        size: 56,
        // Log ticks by their significant digits (0.5, 1, 2, 10), linear ones to 2 decimals.
        values: (u, v) => v.map((t) => (t === null ? "" : opts.log ? String(Number(t.toPrecision(2))) : fmt(t, 2))),
      },
    ],
    series: [
      { label: "round", value: (u, v) => (v === null || v === undefined ? "–" : String(v)) },
      ...series.map((s, i) => ({
        label: s.name,
        stroke: s.color || COLORS[i % COLORS.length],
        width: 2,
        dash: s.dash,
        spanGaps: true,
        points: { show: true, size: 6 },
        value: (u, v) => fmt(v, opts.log ? 4 : 3),
      })),
    ],
    legend: { live: true },
  }, data, box);
  box.chart = plot;
  return box;
}

// ---------------------------------------------------------------- views

function card(k, v, id) {
  return el("div", { class: "card" }, el("div", { class: "k" }, k), el("div", { class: "v", ...(id ? { id } : {}) }, v));
}

async function viewOverview(root) {
  const o = await api("/api/metrics/overview");
  const auc = await api("/api/metrics/auc-history");
  const p = o.progress;
  root.append(
    el("h1", {}, "Overview"),
    el("div", { class: "cards" },
      card("Status", p.status, "status"),
      card("Round", `${o.rounds_recorded} / ${p.total_rounds || o.rounds_recorded}`, "round-counter"),
      card("Macro AUROC (held-out)", fmt(o.last_auroc)),
      card("Best AUROC", fmt(o.best_auroc)),
      card("Held-out loss", fmt(o.last_loss, 4)),
      card("Hospitals active", `${o.active_clients} / ${o.clients}`),
      card("Protection", [
        ({ all: "CKKS whole update", head: "CKKS head" }[p.encrypt] || "nothing encrypted") + (p.keys === "multiparty" && p.encrypt !== "none" ? ` (multiparty keys${p.threshold ? `, any ${p.threshold} switch` : ""})` : ""),
        { sample: "DP-SGD per image", client: "client-level DP", off: "no DP" }[p.dp_mode] || "DP per hospital",
      ].join(" · ")),
      card("Aggregator", p.aggregator || "–"),
    ),
    o.suspicious_clients.length
      ? el("p", {}, el("span", { class: "flag" }, "suspicious"), " ", o.suspicious_clients.join(", "))
      : el("p", { class: "muted" }, "No hospital is flagged as suspicious."),
    el("div", { class: "charts" },
      lineChart("overview-auroc", "Macro AUROC per round", [{ name: "macro", points: auc.map((a) => [a.round, a.macro_auroc]) }], { y1: 1 })),
  );
}

// `?job=N` for the reads of a chosen job (none: the one training, or
// else the one that started last).
const jobQuery = (job, sep = "?") => (job ? `${sep}job=${encodeURIComponent(job)}` : "");

async function viewTraining(root, job) {
  const [o, cur, auc, loss, rounds] = await Promise.all([
    api(`/api/metrics/overview${jobQuery(job)}`),
    api(`/api/training/rounds/current${jobQuery(job)}`),
    api(`/api/metrics/auc-history${jobQuery(job)}`),
    api(`/api/metrics/loss-history${jobQuery(job)}`),
    api(`/api/training/rounds${jobQuery(job)}`),
  ]);
  const j = o.job;
  // Live numbers are the job training's; another job shows what it recorded.
  const live = !j || cur.progress.job === j.id;
  const p = cur.progress;
  const done = rounds.length;
  const total = live ? p.total_rounds : (j.settings.rounds || done);
  const mnist = j && j.kind === "mnist";
  const curve = mnist ? await api(`/api/jobs/${j.id}/curve`) : null;
  const running = live && (p.status === "training" || p.status === "preparing");
  const stopNote = el("span", { class: "muted", id: "stop-note" });
  const stop = el("button", { id: "stop-training", type: "button" }, "Stop after this round");
  stop.addEventListener("click", async () => {
    stop.disabled = true;
    try {
      await api("/api/training/stop", { method: "POST" });
      stopNote.textContent = " The run stops after the current round (its checkpoint is kept; resume it on the runs page).";
    } catch (e) {
      stopNote.textContent = ` ${e.message}`;
      stop.disabled = false;
    }
  });
  const quality = mnist
    ? lineChart("accuracy-chart", "Test accuracy", [{ name: "accuracy", points: curve.points.map((c) => [c.round, c.value]) }], { y1: 1 })
    : lineChart("auroc-chart", "Held-out macro AUROC", [{ name: "macro", points: auc.map((a) => [a.round, a.macro_auroc]) }], { y1: 1 });
  const lastQuality = mnist ? (j.accuracy ?? null) : (rounds.length ? rounds[rounds.length - 1].auroc_macro : null);
  root.append(
    el("h1", {}, "Training monitor"),
    j ? el("p", { id: "job-title" }, el("a", { href: "#/runs" }, `Run ${j.id}`), `: ${j.name} · `,
      el("span", { class: `status-${j.status}` }, j.status)) : "",
    can("control_training") && running ? el("p", {}, stop, stopNote) : "",
    el("div", { class: "cards" },
      card("Status", live ? p.status : j.status, "status"),
      card("Rounds recorded", `${done} / ${total || done}`, "round-counter"),
      card("Training round", live ? (p.current_round || "–") : "–"),
      card(mnist ? "Last accuracy" : "Last macro AUROC", fmt(lastQuality), mnist ? "last-accuracy" : "last-auroc"),
    ),
    el("div", { class: "charts" },
      quality,
      lineChart("loss-chart", "Loss (log scale)", [
        { name: "held-out", points: loss.map((l) => [l.round, l.loss]) },
        { name: "training", points: loss.map((l) => [l.round, l.train_loss]) },
      ], { log: true }),
    ),
    el("h2", {}, "Rounds"),
    el("table", { id: "rounds-table" },
      el("tr", {}, ["Round", "Outcome", "Accepted", "Rejected", "Loss", mnist ? "Accuracy" : "AUROC", "Step norm", "Duration"].map((h) => el("th", {}, h))),
      rounds.slice().reverse().map((r) => el("tr", {},
        el("td", {}, el("a", { href: `#/rounds/${r.id}${j ? `/${j.id}` : ""}` }, r.id)),
        el("td", {}, r.outcome), el("td", {}, r.accepted),
        el("td", { class: r.rejected ? "bad" : "" }, r.rejected),
        el("td", {}, fmt(r.loss, 4)),
        el("td", {}, fmt(mnist ? (curve.points.find((c) => c.round === r.id) || {}).value : r.auroc_macro)),
        el("td", {}, fmt(r.update_norm, 3)), el("td", {}, `${(r.duration_ms / 1000).toFixed(1)} s`))),
    ),
  );
  if (mnist && j.settings.cross_site && j.status === "finished") {
    const cs = await api(`/api/jobs/${j.id}/cross-site`).catch(() => null);
    if (cs) root.append(...crossSiteTable(cs.matrix));
  }
  if (auc.length && !mnist) {
    const last = auc[auc.length - 1];
    root.append(el("h2", {}, `Per-label AUROC after round ${last.round}`),
      el("table", { id: "per-label" }, el("tr", {}, el("th", {}, "Finding"), el("th", {}, "AUROC")),
        Object.entries(last.per_label).map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, fmt(v))))));
  }
}

async function viewRound(root, id, job) {
  const d = await api(`/api/training/rounds/${encodeURIComponent(id)}${jobQuery(job)}`);
  const r = d.round;
  root.append(
    el("h1", {}, `Round ${r.id}`),
    el("p", {}, `${r.outcome} · ${r.aggregator} · started ${when(r.started_at)} · ${(r.duration_ms / 1000).toFixed(1)} s`),
    d.notes.length
      ? el("ul", { id: "round-notes" }, d.notes.map((n) => el("li", {}, el("strong", {}, n.client), `: ${n.note}`)))
      : el("p", { class: "muted", id: "round-notes" }, "No sampled hospital was left out, flagged, or weighed less than half the mean of the others."),
    el("table", { id: "round-updates" },
      el("tr", {}, ["Hospital", "Counted", "Reason", "Weight", "Trust", "Update norm", "Images", "ε spent", "Uploaded"].map((h) => el("th", {}, h))),
      d.updates.map((u) => el("tr", {},
        el("td", {}, el("a", { href: `#/clients/${u.client_id}` }, u.client_id)),
        el("td", { class: u.accepted ? "good" : "bad" }, u.accepted ? "accepted" : "rejected"),
        el("td", {}, u.reason || ""), el("td", {}, fmt(u.weight)), el("td", {}, fmt(u.trust)),
        el("td", {}, fmt(u.update_norm)), el("td", {}, u.num_examples ?? "–"), el("td", {}, fmt(u.epsilon, 2)),
        el("td", {}, kib(u.upload_bytes)))),
    ),
    el("p", { class: "muted", id: "round-bytes" }, `Uploaded this round: ${d.updates.some((u) => u.upload_bytes != null) ? kib(d.updates.reduce((a, u) => a + (u.upload_bytes || 0), 0)) : "not recorded"}.`),
    el("h2", {}, "Metrics"),
    el("table", {}, Object.entries(d.metrics).map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, fmt(v, 4))))),
  );
}

async function viewClients(root) {
  const cs = await api("/api/clients");
  const rows = cs.map((c) => {
    const action = can("manage_clients")
      ? el("button", {
          type: "button",
          class: "status-toggle",
          "data-client": c.id,
          onclick: async () => {
            await api(`/api/clients/${encodeURIComponent(c.id)}/status`, {
              method: "PATCH",
              headers: { "Content-Type": "application/json" },
              body: JSON.stringify({ status: c.status === "active" ? "suspended" : "active" }),
            });
            route();
          },
        }, c.status === "active" ? "Suspend" : "Reactivate")
      : "";
    return el("tr", {},
      el("td", {}, el("a", { href: `#/clients/${c.id}` }, c.id)),
      el("td", { class: c.status === "active" ? "good" : "bad" }, c.status),
      el("td", {}, c.examples), el("td", {}, c.patients),
      el("td", {}, fmt(c.trust)), el("td", {}, fmt(c.trust_ema)),
      el("td", {}, c.suspicious ? el("span", { class: "flag" }, "suspicious") : ""),
      el("td", {}, fmt(c.epsilon, 2)), el("td", {}, `${c.rounds_accepted} / ${c.rounds_rejected}`),
      el("td", {}, action));
  });
  root.append(el("h1", {}, "Hospitals"),
    el("table", { id: "clients-table" },
      el("tr", {}, ["Hospital", "Status", "Images", "Patients", "Trust", "Trust (avg)", "", "ε spent", "Counted / not", ""].map((h) => el("th", {}, h))),
      rows));
  const trusts = await Promise.all(cs.map((c) => api(`/api/clients/${encodeURIComponent(c.id)}/trust`)));
  root.append(el("div", { class: "charts" }, lineChart("trust-chart", "Trust per round (moving average)",
    cs.map((c, i) => ({ name: c.id, points: trusts[i].map((t) => [t.round_id, t.trust_ema ?? t.trust]) })), { y0: 0, y1: 1 })));
  const conn = await api("/api/connections");
  if (conn.deployed || conn.sites.length) root.append(connections(conn));
}

const ago = (ms) => {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 90 ? `${s} s ago` : s < 5400 ? `${Math.round(s / 60)} min ago` : when(ms);
};
const short = (fp) => (fp ? `${fp.slice(0, 16)}…` : "–");
const megabytes = (b) => `${(b / 1e6).toFixed(b < 1e7 ? 1 : 0)} MB`;
// A model moving now: "download 45 % of 28 MB, 1.2 MB/s, 12 s left".
const transfer = (t) => {
  const pct = t.total ? Math.floor((100 * t.bytes) / t.total) : 100;
  const eta = t.eta_s == null ? "" : t.eta_s < 90 ? `, ${Math.ceil(t.eta_s)} s left` : `, ${Math.ceil(t.eta_s / 60)} min left`;
  return `${t.direction} ${pct} % of ${megabytes(t.total)}, ${megabytes(t.rate_bytes_per_s)}/s${eta}${t.resumed ? " (resumed)" : ""}`;
};
const DAY = 24 * 3600 * 1000;

// A deployed server's hospitals on the wire: sessions, certificates,
// refused connections; revoke and rotate on the roster.
function connections(conn) {
  const manage = can("manage_clients") && conn.deployed;
  const post = async (path, body) => {
    try {
      await api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body || {}) });
    } catch (e) {
      alert(e.message);
    }
    route();
  };
  const actions = (s) => {
    if (!manage || !s.certificates.length) return "";
    const active = s.certificates.some((c) => !c.revoked);
    const file = el("input", { type: "file", accept: ".pem,.crt", class: "hidden", "data-site": s.site });
    file.addEventListener("change", async () => {
      if (!file.files.length) return;
      const certificate = await file.files[0].text();
      await post(`/api/connections/${encodeURIComponent(s.site)}/certificate`, { certificate });
    });
    return [
      active ? el("button", {
        type: "button", class: "revoke", "data-site": s.site,
        onclick: () => {
          if (confirm(`Revoke every certificate of ${s.site}? Its session closes within seconds and it cannot connect again until it gets a new certificate.`)) {
            post(`/api/connections/${encodeURIComponent(s.site)}/revoke`);
          }
        },
      }, "Revoke") : "",
      " ",
      el("button", { type: "button", class: "rotate", "data-site": s.site, onclick: () => file.click() }, "New certificate…"),
      file,
    ];
  };
  const rows = conn.sites.map((s) => {
    const c = s.connection;
    const expiry = c && c.not_after;
    const soon = expiry && expiry - Date.now() < 30 * DAY;
    const active = s.certificates.filter((x) => !x.revoked).length;
    return el("tr", { "data-site": s.site },
      el("td", {}, s.site),
      el("td", { class: s.connected ? "good" : "bad" }, s.connected ? "connected" : c ? "disconnected" : "never connected",
        s.suspended ? " · suspended" : ""),
      el("td", {}, c ? ago(c.last_seen) : "–"),
      el("td", { class: "transfer" }, s.transfers.length ? s.transfers.map(transfer).join("; ") : "–"),
      el("td", {}, c && c.peer ? c.peer : "–"),
      el("td", { title: c ? c.fingerprint : "" }, el("code", {}, c ? short(c.fingerprint) : "–")),
      el("td", { class: soon ? "bad" : "" }, expiry ? new Date(expiry).toLocaleDateString() : "–"),
      el("td", {}, s.certificates.length ? `${active} active, ${s.certificates.length - active} revoked` : "not on the roster"),
      el("td", { class: "muted" }, c && c.close_reason ? c.close_reason : ""),
      el("td", {}, actions(s)));
  });
  const refused = conn.refused.map((r) => el("tr", {},
    el("td", {}, when(r.at)), el("td", {}, r.site),
    el("td", { class: "bad" }, r.kind.replaceAll("_", " "), r.closed_session ? " (session closed)" : ""),
    el("td", {}, r.peer || "–"), el("td", { title: r.fingerprint }, el("code", {}, short(r.fingerprint)))));
  return el("section", { id: "connections" },
    el("h2", {}, "Connections"),
    el("p", { class: "muted" }, "Each hospital's session with this server over mutual TLS: a heartbeat every 2 s while connected; a model moving to or from it shows its progress (a dropped connection resumes where it stopped). ",
      "Revoking takes effect at the next heartbeat; a new certificate is issued where the project CA is kept (fedcore-deploy rotate) and listed here."),
    el("table", { id: "connections-table" },
      el("tr", {}, ["Hospital", "Session", "Last heartbeat", "Transfer", "From", "Certificate", "Expires", "Roster", "Last closed because", ""].map((h) => el("th", {}, h))),
      rows),
    el("h3", {}, "Refused connections"),
    refused.length
      ? el("table", { id: "refused-table" }, el("tr", {}, ["When", "Certificate of", "Why", "From", "Fingerprint"].map((h) => el("th", {}, h))), refused)
      : el("p", { class: "muted", id: "refused-none" }, "None."));
}

async function viewClient(root, id) {
  const [c, trust] = await Promise.all([
    api(`/api/clients/${encodeURIComponent(id)}`),
    api(`/api/clients/${encodeURIComponent(id)}/trust`),
  ]);
  root.append(
    el("h1", {}, c.id, " ", c.suspicious ? el("span", { class: "flag" }, "suspicious") : ""),
    el("div", { class: "cards" }, card("Status", c.status), card("Images", c.examples), card("Patients", c.patients),
      card("Trust", fmt(c.trust)), card("ε spent", fmt(c.epsilon, 2))),
    el("div", { class: "charts" }, lineChart("client-trust", "Trust timeline", [
      { name: "score", points: trust.map((t) => [t.round_id, t.trust]) },
      { name: "moving average", points: trust.map((t) => [t.round_id, t.trust_ema]) },
    ], { y0: 0, y1: 1 })),
    el("table", {}, el("tr", {}, ["Round", "Trust", "Average", "Flag"].map((h) => el("th", {}, h))),
      trust.map((t) => el("tr", {}, el("td", {}, el("a", { href: `#/rounds/${t.round_id}` }, t.round_id)),
        el("td", {}, fmt(t.trust)), el("td", {}, fmt(t.trust_ema)), el("td", {}, t.suspicious ? "suspicious" : "")))),
  );
}

async function viewPrivacy(root) {
  const [ps, cur] = await Promise.all([api("/api/metrics/privacy"), api("/api/training/rounds/current")]);
  root.append(el("h1", {}, "Privacy budget per hospital"),
    el("p", { class: "muted", id: "privacy-mechanism" }, dpExplanation(cur.progress)),
    el("table", { id: "privacy-table" },
      el("tr", {}, ["Hospital", "ε spent", "δ", "Budget ε", "Used"].map((h) => el("th", {}, h))),
      ps.map((p) => {
        const frac = p.budget && p.epsilon !== null ? p.epsilon / p.budget[0] : 0;
        const bar = el("span", { class: frac > 1 ? "over" : "" });
        bar.style.width = `${Math.min(100, frac * 100).toFixed(0)}%`;
        return el("tr", {}, el("td", {}, p.client), el("td", {}, fmt(p.epsilon, 2)), el("td", {}, p.delta ?? "–"),
          el("td", {}, p.budget ? p.budget[0] : "DP off"), el("td", {}, el("span", { class: "bar" }, bar)));
      })),
    el("div", { class: "charts" }, lineChart("privacy-chart", "ε spent per round, against the budget",
      privacySeries(ps), privacyRange(ps))));
}

// The privacy chart's y axis: from 0 to a little above the budget (or the
// largest ε spent, if a hospital reports more than the first budget).
function privacyRange(ps) {
  const top = Math.max(0, ...ps.map((p) => (p.budget ? p.budget[0] : 0)), ...ps.flatMap((p) => p.history.map(([, e]) => e)));
  return top > 0 ? { y0: 0, y1: top * 1.1 } : {};
}

// What the hospitals' differential privacy and encryption do, in words.
function dpExplanation(p) {
  const dp = {
    sample: "Each hospital trains with DP-SGD: every step clips each image's gradient and adds Gaussian noise, so that each image's influence on everything the hospital sends is bounded by (ε, δ). The hospital's accountant counts what each round spent, and the hospital stops before a round would exceed its budget.",
    client: "Each hospital clips the part of its update that travels in the clear and adds Gaussian noise before it leaves (client-level DP); its accountant converts the noise into (ε, δ).",
    off: "Differential privacy is off: the updates carry what the hospitals' images taught the model.",
  }[p.dp_mode] || "Each hospital chooses its own differential privacy and reports with every update what it has spent; the table shows those reports.";
  const enc = {
    all: " Every update travels CKKS-encrypted.",
    head: " The classifier head travels CKKS-encrypted.",
  }[p.encrypt] || "";
  const keys = p.encrypt && p.encrypt !== "none" && p.keys === "multiparty"
    ? " It is encrypted under multiparty keys: a collective key made from a share of each hospital, so that no hospital, nor the server, can decrypt another hospital's upload; each round, the hospitals switch the server's encrypted sum to their output key."
      + (p.threshold ? ` Any ${p.threshold} of them suffice (threshold keys), so a round completes while the others are away.` : " Every hospital must answer every round.")
    : "";
  return dp + enc + keys;
}

// Each hospital's ε after each round it took part in, and the budget as a
// flat line over the same rounds: a hospital stops before it would cross it.
// Every hospital starts at ε = 0 before round 1 (the round-0 point).
function privacySeries(ps) {
  const series = ps.map((p) => ({ name: p.client, points: p.history.length ? [[0, 0], ...p.history] : [] }));
  const budget = ps.find((p) => p.budget)?.budget;
  const rounds = ps.flatMap((p) => p.history.map(([r]) => r));
  if (budget && rounds.length) {
    const first = 0, last = Math.max(...rounds);
    series.push({ name: `budget ε = ${budget[0]}`, points: [[first, budget[0]], [last, budget[0]]], dash: [6, 4], color: "#667085" });
  }
  return series;
}

// ---------------------------------------------------------------- runs

const METRIC = { mnist: "accuracy", xray: "auroc_macro", deployment: "auroc_macro" };

// The cross-site matrix: a row per model (the global one, then each
// hospital's last local model), a column per hospital's held-out data.
function crossSiteTable(m) {
  const cell = (c) => (c && c.metrics && c.metrics.accuracy !== undefined ? `${(c.metrics.accuracy * 100).toFixed(1)} %` : "–");
  const modelName = (x) => (x.type === "global" ? "global model" : `${x.site}'s local model (round ${x.round})`);
  return [
    el("h2", {}, `Cross-site accuracy after round ${m.round}`),
    el("p", { class: "muted" }, "Each model scored on each hospital's held-out tenth of its share, which it did not train on."),
    el("table", { id: "cross-site" },
      el("tr", {}, el("th", {}, "Model"), m.sites.map((s) => el("th", {}, s))),
      m.models.map((x, i) => el("tr", {}, el("td", {}, modelName(x)), m.cells[i].map((c) => el("td", {}, cell(c)))))),
  ];
}

function jobQuality(j) {
  return j.kind === "mnist" ? `accuracy ${fmt(j.accuracy)}` : `AUROC ${fmt(j.auroc_macro)}`;
}

// What a job was asked for, in a few words.
function jobSettings(j) {
  const s = j.settings || {};
  if (j.kind === "mnist") {
    return `${s.hospitals} hospitals · ${s.aggregator}${s.server_optimizer && s.server_optimizer !== "sgd" ? ` + server ${s.server_optimizer}` : ""}${s.proximal_mu ? ` · FedProx μ ${s.proximal_mu}` : ""} · ${s.epsilon ? `DP ε ${s.epsilon}` : "no DP"}${s.byzantine ? ` · hospital ${s.byzantine} Byzantine` : ""}${s.drop_hospital ? ` · hospital ${s.drop_hospital} drops` : ""}${s.cross_site ? " · cross-site" : ""}${s.upload && s.upload !== "f32" ? ` · uploads in ${s.upload}` : ""}`;
  }
  if (j.kind === "xray" && s.clients) {
    const dp = s.dp && s.dp.mode !== "off" ? `DP ε ${s.dp.epsilon}` : "no DP";
    return `${s.chestxray14 ? "ChestX-ray14" : "synthetic"} ${s.image_size} px · ${s.clients} hospitals · ${s.aggregator} · ${dp} · encrypt ${s.encrypt}${s.keys === "multiparty" ? ` · multiparty keys${s.threshold ? ` (${s.threshold} of ${s.clients})` : ""}` : ""}${s.byzantine ? ` · hospital ${s.byzantine} Byzantine` : ""}${s.drop_client ? ` · hospital ${s.drop_client} drops` : ""}`;
  }
  return s.rounds ? `${s.rounds} rounds` : "";
}

function jobForm(choices, msg, onDone) {
  const field = (label, input) => el("label", {}, label, " ", input);
  const data = el("select", { id: "job-data" }, choices.data.map((d) => el("option", { value: d },
    { synthetic_xrays: "Synthetic X-rays", chestxray14: "ChestX-ray14 (server folder)", mnist: "MNIST" }[d] || d)));
  const model = el("span", { class: "muted", id: "job-model" });
  const size = el("input", { id: "job-size", type: "number", min: "32", max: "224", step: "32", value: "64" });
  const agg = el("select", { id: "job-aggregator" }, choices.aggregators.map((a) => el("option", { value: a }, a)));
  const rounds = el("input", { id: "job-rounds", type: "number", min: "1", max: "100", value: "5" });
  const hospitals = el("input", { id: "job-hospitals", type: "number", min: "1", max: "10", value: "3" });
  const dp = el("input", { id: "job-dp", type: "checkbox", checked: "" });
  const eps = el("input", { id: "job-epsilon", type: "number", min: "0.1", max: "100", step: "0.1", value: "8" });
  const enc = el("select", { id: "job-encrypt" }, [["head", "CKKS head"], ["all", "CKKS whole update"], ["none", "none"]].map(([v, t]) => el("option", { value: v }, t)));
  const keys = el("select", { id: "job-keys" }, [["single", "one key pair"], ["multiparty", "multiparty (each hospital a share)"]].map(([v, t]) => el("option", { value: v }, t)));
  const threshold = el("input", { id: "job-threshold", type: "number", min: "2", max: "10", placeholder: "every hospital" });
  const byz = el("input", { id: "job-byzantine", type: "number", min: "1", max: "10", placeholder: "none" });
  const drop = el("input", { id: "job-drop", type: "number", min: "1", max: "10", placeholder: "none" });
  const name = el("input", { id: "job-name", placeholder: "(from the settings)", maxlength: "80" });
  const serverOpt = el("select", { id: "job-server-optimizer" }, (choices.server_optimizers || []).map((o) => el("option", { value: o }, o)));
  const mu = el("input", { id: "job-mu", type: "number", min: "0", max: "10", step: "0.001", value: "0" });
  const crossSite = el("input", { id: "job-cross-site", type: "checkbox" });
  const upload = el("select", { id: "job-upload" }, (choices.uploads || []).map((o) => el("option", { value: o }, o)));
  const thresholdField = field("Key-switch threshold", threshold);
  const xrayOnly = [field("Image size", size), field("Encryption", enc), field("HE keys", keys), thresholdField];
  const mnistOnly = [field("Server optimizer", serverOpt), field("FedProx μ", mu), field("Cross-site evaluation", crossSite), field("Upload encoding", upload)];
  const sync = () => {
    const mnist = data.value === "mnist";
    model.textContent = mnist ? "small CNN (26,010 parameters)" : "DenseNet-121";
    xrayOnly.forEach((f) => { f.hidden = mnist; });
    mnistOnly.forEach((f) => { f.hidden = !mnist; });
    thresholdField.hidden = mnist || keys.value !== "multiparty";
    eps.disabled = !dp.checked;
  };
  data.addEventListener("change", sync);
  dp.addEventListener("change", sync);
  keys.addEventListener("change", sync);
  const form = el("form", { class: "inline job-form", id: "job-form" },
    field("Data", data), field("Model", model), ...xrayOnly, field("Aggregator", agg),
    field("Rounds", rounds), field("Hospitals", hospitals), field("DP-SGD", dp), field("ε per hospital", eps),
    field("Byzantine hospital", byz), field("Dropping hospital", drop), ...mnistOnly, field("Name", name),
    el("button", { type: "submit", class: "primary", id: "job-start" }, "Start run"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const mnist = data.value === "mnist";
    const body = {
      data: data.value, aggregator: agg.value, rounds: Number(rounds.value), hospitals: Number(hospitals.value),
      dp: dp.checked, ...(dp.checked ? { epsilon: Number(eps.value) } : {}),
      ...(mnist ? {} : { image_size: Number(size.value), encrypt: enc.value, keys: keys.value }),
      ...(!mnist && keys.value === "multiparty" && threshold.value ? { threshold: Number(threshold.value) } : {}),
      ...(mnist ? { server_optimizer: serverOpt.value, proximal_mu: Number(mu.value), cross_site: crossSite.checked, ...(upload.value ? { upload: upload.value } : {}) } : {}),
      ...(byz.value ? { byzantine: Number(byz.value) } : {}),
      ...(drop.value ? { drop_hospital: Number(drop.value) } : {}),
      ...(name.value.trim() ? { name: name.value.trim() } : {}),
    };
    try {
      const j = await api("/api/jobs", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
      msg.className = "muted";
      msg.textContent = `Run ${j.id} queued: ${j.name}`;
      await onDone();
    } catch (e) {
      msg.className = "error";
      msg.textContent = e.message;
    }
  });
  sync();
  return form;
}

async function viewRuns(root) {
  const [jobs, choices] = await Promise.all([api("/api/jobs"), api("/api/jobs/choices")]);
  const msg = el("p", { class: "muted", id: "jobs-msg" });
  const table = el("div", { id: "runs" });
  const selected = new Set();
  const act = async (j, what) => {
    try {
      if (what === "delete") {
        if (!confirm(`Delete run ${j.id} with everything it recorded?`)) return;
        await api(`/api/jobs/${j.id}`, { method: "DELETE" });
      } else {
        await api(`/api/jobs/${j.id}/${what}`, { method: "POST" });
      }
      msg.className = "muted";
      msg.textContent = `Run ${j.id}: ${what === "stop" ? "stopping after its current round" : what === "resume" ? "queued to continue from its checkpoint" : "deleted"}.`;
      await render();
    } catch (e) {
      msg.className = "error";
      msg.textContent = e.message;
    }
  };
  const compare = el("button", { type: "button", id: "compare", disabled: "" }, "Compare selected");
  compare.addEventListener("click", () => { location.hash = `#/compare/${[...selected].join(",")}`; });
  async function render() {
    const list = await api("/api/jobs");
    const admin = can("control_training");
    table.replaceChildren(el("table", { id: "runs-table" },
      el("tr", {}, ["", "Run", "Name", "Settings", "Status", "Rounds", "Result", "ε", "Started by", "Created", ""].map((h) => el("th", {}, h))),
      list.map((j) => {
        const box = el("input", { type: "checkbox", class: "compare-box", "data-job": String(j.id) });
        box.checked = selected.has(j.id);
        box.addEventListener("change", () => {
          if (box.checked) selected.add(j.id); else selected.delete(j.id);
          compare.disabled = selected.size < 1;
        });
        const actions = admin ? [
          ["queued", "running"].includes(j.status)
            ? el("button", { type: "button", class: "job-stop", "data-job": String(j.id), onclick: () => act(j, "stop") }, "Stop") : "",
          ["stopped", "failed"].includes(j.status) && j.kind !== "deployment"
            ? el("button", { type: "button", class: "job-resume", "data-job": String(j.id), onclick: () => act(j, "resume") }, "Resume") : "",
          !["running", "stopping"].includes(j.status)
            ? el("button", { type: "button", class: "job-delete", "data-job": String(j.id), onclick: () => act(j, "delete") }, "Delete") : "",
        ] : [];
        return el("tr", { "data-job": String(j.id), "data-status": j.status },
          el("td", {}, box),
          el("td", {}, el("a", { href: `#/training/${j.id}` }, j.id)),
          el("td", {}, j.name), el("td", { class: "muted" }, jobSettings(j)),
          el("td", { class: `status-${j.status}` }, j.status, j.error ? el("div", { class: "error" }, j.error) : ""),
          el("td", {}, j.rounds), el("td", {}, j.rounds ? jobQuality(j) : "–"), el("td", {}, fmt(j.epsilon, 2)),
          el("td", {}, j.created_by || "command line"), el("td", {}, when(j.created_at)),
          el("td", {}, ...actions.map((a) => (a ? [a, " "] : ""))));
      })));
  }
  root.append(el("h1", {}, "Runs"));
  if (can("control_training") && choices.enabled) {
    root.append(el("h2", {}, "Start a run"),
      el("p", { class: "muted" }, "Runs wait in a queue and train one at a time. A stopped run continues from its last checkpoint; its hospitals' privacy ledgers keep counting."),
      jobForm(choices, msg, render), msg);
  } else if (can("control_training")) {
    root.append(msg, el("p", { class: "muted" }, "This server runs a deployment: its run is the one listed; simulated runs start under `hospital simulate`."));
  } else {
    root.append(msg);
  }
  root.append(el("h2", {}, "Every run"), el("p", {}, compare, " ", el("span", { class: "muted" }, "Tick runs to overlay their curves.")), table);
  await render();
  return render;
}

async function viewCompare(root, ids) {
  const list = (ids || "").split(",").map(Number).filter((n) => Number.isInteger(n) && n > 0);
  const curves = await Promise.all(list.map((id) => api(`/api/jobs/${id}/curve`)));
  const label = (c) => `run ${c.job.id}`;
  root.append(el("h1", {}, "Compare runs"), el("p", {}, el("a", { href: "#/runs" }, "← all runs")),
    el("table", { id: "compare-table" },
      el("tr", {}, ["Run", "Name", "Settings", "Status", "Rounds", "Result", "ε spent", "Budget ε"].map((h) => el("th", {}, h))),
      curves.map((c) => el("tr", {}, el("td", {}, el("a", { href: `#/training/${c.job.id}` }, c.job.id)), el("td", {}, c.job.name),
        el("td", { class: "muted" }, jobSettings(c.job)), el("td", {}, c.job.status), el("td", {}, c.job.rounds),
        el("td", {}, jobQuality(c.job)), el("td", {}, fmt(c.job.epsilon, 2)), el("td", {}, c.budget ? c.budget[0] : "DP off")))));
  const charts = el("div", { class: "charts" });
  for (const [metric, title] of [["accuracy", "Test accuracy"], ["auroc_macro", "Held-out macro AUROC"]]) {
    const of = curves.filter((c) => c.metric === metric);
    if (of.length) {
      charts.append(lineChart(`compare-${metric}`, `${title} per round`,
        of.map((c) => ({ name: label(c), points: c.points.map((p) => [p.round, p.value]) })), { y1: 1 }));
    }
  }
  charts.append(lineChart("compare-epsilon", "ε spent per round (largest of the hospitals)",
    curves.filter((c) => c.points.some((p) => p.epsilon !== null)).map((c) => ({
      name: label(c), points: [[0, 0], ...c.points.map((p) => [p.round, p.epsilon])],
    }))));
  root.append(charts);
}

// What protected the model that answered, in a few words.
function protections(p) {
  const dp = { sample: "DP-SGD per image", client: "client-level DP", off: "no DP" }[p.dp_mode];
  const eps = p.budget ? ` (ε ≤ ${p.budget[0]} per hospital)` : "";
  const enc = { all: "whole updates CKKS-encrypted", head: "classifier CKKS-encrypted", none: "nothing encrypted" }[p.encrypt];
  return [dp + eps, enc].filter(Boolean).join(" · ");
}

async function viewInference(root) {
  const out = el("div", { id: "inference-result" });
  const form = el("form", { class: "inline", id: "inference-form" },
    el("label", {}, "Chest X-ray (PNG or JPEG) ", el("input", { type: "file", id: "xray", name: "image", accept: "image/png,image/jpeg", required: "" })),
    el("button", { type: "submit", class: "primary" }, "Find"));
  let shownUrl = null;
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    out.replaceChildren(el("p", { class: "muted" }, "Running…"));
    const fd = new FormData();
    const f = $("xray").files[0];
    if (!f) return;
    fd.append("image", f);
    try {
      const p = await api("/api/inference/predict", { method: "POST", body: fd });
      if (shownUrl) URL.revokeObjectURL(shownUrl);
      shownUrl = URL.createObjectURL(f);
      // The image with the heatmap of the chosen finding laid over it.
      const overlay = el("img", { id: "saliency-overlay", class: "overlay", alt: "" });
      const caption = el("div", { class: "muted", id: "saliency-caption" });
      const show = (s) => {
        if (!s) { overlay.hidden = true; caption.textContent = "No heatmap (the model changed while it was computed)."; return; }
        overlay.hidden = false;
        overlay.src = s.heatmap_png;
        caption.textContent = s.evidence
          ? `Where the model looked for ${s.label} (${fmt(s.probability * 100, 1)} %): Grad-CAM on the last dense block; red is strongest.`
          : `No part of the image raised the score of ${s.label} (${fmt(s.probability * 100, 1)} %): Grad-CAM is zero everywhere.`;
        picks.querySelectorAll("button").forEach((b) => b.classList.toggle("active", b.dataset.label === s.label));
      };
      const picks = el("div", { class: "picks", id: "saliency-picks" }, p.saliency.map((s) =>
        el("button", { type: "button", "data-label": s.label, onclick: () => show(s) }, s.label)));
      const top = p.findings[0] ? p.findings[0].probability : 1;
      out.replaceChildren(
        el("p", { id: "inference-model" }, `Model after round ${p.model_round} · ${p.protections ? protections(p.protections) : "protections not recorded"} · ${p.width}×${p.height} · sha256 ${p.image_sha256.slice(0, 12)}…`),
        el("div", { class: "reading" },
          el("figure", { class: "xray-figure" },
            el("div", { class: "xray-box" }, el("img", { id: "xray-image", src: shownUrl, alt: "the uploaded X-ray" }), overlay),
            picks, caption),
          el("table", { id: "findings", class: "findings" }, el("tr", {}, el("th", {}, "Finding"), el("th", {}, "Probability"), el("th", {}, "")),
            p.findings.map((x) => {
              const bar = el("span", {});
              bar.style.width = `${Math.max(1, (x.probability / Math.max(top, 1e-9)) * 100).toFixed(0)}%`;
              return el("tr", {}, el("td", {}, x.label), el("td", {}, `${fmt(x.probability * 100, 1)} %`), el("td", {}, el("span", { class: "bar" }, bar)));
            }))),
      );
      show(p.saliency[0]);
      await history();
    } catch (e) {
      out.replaceChildren(el("p", { class: "error" }, e.message));
    }
  });
  const hist = el("div", { id: "inference-history" });
  async function history() {
    const h = await api("/api/inference/history");
    hist.replaceChildren(el("table", {}, el("tr", {}, ["When", "User", "Model round", "Image", "Top finding"].map((x) => el("th", {}, x))),
      h.map((r) => el("tr", {}, el("td", {}, when(r.created_at)), el("td", {}, r.username || `user ${r.user_id}`), el("td", {}, r.model_round ?? "–"),
        el("td", {}, `${r.width}×${r.height} ${r.image_sha256.slice(0, 10)}…`),
        el("td", {}, r.parsed.length ? `${r.parsed[0].label} ${fmt(r.parsed[0].probability)}` : "")))));
  }
  root.append(el("h1", {}, "Inference"),
    el("p", { class: "muted" }, "The image is read by the latest global model on this server and not stored; its hash, the findings and who asked are logged. The heatmap shows where the model found the evidence for a finding; it is not a diagnosis."),
    form, out, el("h2", {}, "History"), hist);
  await history();
}

async function viewAudit(root) {
  const rows = await api("/api/audit?limit=300");
  root.append(el("h1", {}, "Audit log"),
    el("table", { id: "audit-table" }, el("tr", {}, ["When", "Who", "Action", "Target", "Outcome", "Detail", "Address"].map((h) => el("th", {}, h))),
      rows.map((a) => el("tr", {}, el("td", {}, when(a.at)), el("td", {}, a.actor), el("td", {}, a.action),
        el("td", {}, a.target || ""), el("td", { class: a.outcome === "success" ? "" : "bad" }, a.outcome),
        el("td", {}, a.detail || ""), el("td", {}, a.ip || "")))));
}

async function viewUsers(root) {
  const users = await api("/api/users");
  const msg = el("p", { class: "error", id: "users-msg" });
  const form = el("form", { class: "inline", id: "new-user" },
    el("label", {}, "User name ", el("input", { id: "nu-name", required: "" })),
    el("label", {}, "Password ", el("input", { id: "nu-pass", type: "password", required: "", minlength: "12" })),
    el("label", {}, "Role ", el("select", { id: "nu-role" }, ["doctor", "viewer", "admin"].map((r) => el("option", { value: r }, r)))),
    el("button", { type: "submit", class: "primary" }, "Create"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      await api("/api/auth/register", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ username: $("nu-name").value, password: $("nu-pass").value, role: $("nu-role").value }),
      });
      route();
    } catch (e) { msg.textContent = e.message; }
  });
  const exportUser = async (u) => {
    const data = await api(`/api/users/${u.id}/export`);
    const a = el("a", { href: URL.createObjectURL(new Blob([JSON.stringify(data, null, 2)], { type: "application/json" })), download: `user-${u.id}.json` });
    a.click();
  };
  const erase = async (u) => {
    if (!confirm(`Erase ${u.username}'s personal data? The account is closed.`)) return;
    try { await api(`/api/users/${u.id}`, { method: "DELETE" }); route(); } catch (e) { msg.textContent = e.message; }
  };
  root.append(el("h1", {}, "Users"), form, msg,
    el("table", {}, el("tr", {}, ["Id", "User", "Role", "Created", ""].map((h) => el("th", {}, h))),
      users.map((u) => el("tr", {}, el("td", {}, u.id), el("td", {}, u.username), el("td", {}, u.role), el("td", {}, when(u.created_at)),
        el("td", {}, el("button", { type: "button", onclick: () => exportUser(u) }, "Export data"), " ",
          el("button", { type: "button", onclick: () => erase(u) }, "Erase"))))));
}

// ---------------------------------------------------------------- routing

const ROUTES = [
  ["overview", "Overview", "view_metrics", viewOverview],
  ["training", "Training", "view_metrics", viewTraining],
  ["runs", "Runs", "view_metrics", viewRuns],
  ["clients", "Hospitals", "view_metrics", viewClients],
  ["privacy", "Privacy", "view_metrics", viewPrivacy],
  ["inference", "Inference", "run_inference", viewInference],
  ["audit", "Audit log", "view_audit", viewAudit],
  ["users", "Users", "manage_users", viewUsers],
];

async function route() {
  const [, name = "training", arg] = location.hash.split("/");
  const root = $("view");
  const nav = $("nav");
  nav.replaceChildren(...ROUTES.filter((r) => can(r[2])).map((r) =>
    el("a", { href: `#/${r[0]}`, class: r[0] === name ? "active" : "" }, r[1])));
  const fresh = el("div", {});
  let own = null; // a view's own refresher (re-renders a part, not its form)
  const jobArg = location.hash.split("/")[3];
  try {
    if (name === "rounds" && arg) await viewRound(fresh, arg, jobArg);
    else if (name === "clients" && arg) await viewClient(fresh, arg);
    else if (name === "training" && arg) await viewTraining(fresh, arg);
    else if (name === "compare") await viewCompare(fresh, arg);
    else {
      const r = ROUTES.find((x) => x[0] === name) || ROUTES[1];
      own = await r[3](fresh);
    }
  } catch (e) {
    fresh.replaceChildren(el("p", { class: "error" }, e.message));
  }
  // uPlot keeps every chart in a global set with window listeners until
  // destroy(): free the page's old charts before they leave the DOM.
  root.querySelectorAll(".chart").forEach((c) => c.chart && c.chart.destroy());
  root.replaceChildren(fresh);
  // Views with charts follow the training live; forms are not re-rendered.
  refresh = typeof own === "function" ? own
    : (["overview", "training", "clients", "privacy"].includes(name) && (!arg || name === "training")) || name === "compare" ? route : null;
}

async function main() {
  try {
    me = await api("/api/auth/me");
  } catch (e) {
    return;
  }
  $("who").textContent = `${me.user.username} (${me.user.role})`;
  $("logout").addEventListener("click", async () => {
    await fetch("/api/auth/logout", { method: "POST", credentials: "same-origin" });
    location.href = "/login";
  });
  window.addEventListener("hashchange", route);
  await route();
  // Access tokens are short-lived: renew this session's cookie well before
  // it ends (the server ends a session 8 h after sign-in; then sign in again).
  const renew = async () => {
    const r = await fetch("/api/auth/refresh", { method: "POST", credentials: "same-origin" });
    if (r.status === 401) { location.href = "/login"; return; }
    const j = r.ok ? await r.json() : { expires_in: 90 };
    setTimeout(renew, Math.max(30, Math.floor(j.expires_in * 2 / 3)) * 1000);
  };
  await renew();
  const live = $("live");
  const es = new EventSource("/api/events");
  // The server closes the stream when the session ends or the token
  // expires; the browser reconnects, and a refused reconnect is checked.
  es.onerror = () => { if (es.readyState === EventSource.CLOSED) api("/api/auth/me").catch(() => {}); };
  let pending = false;
  const kick = () => {
    if (!refresh || pending) return;
    pending = true;
    setTimeout(async () => { pending = false; if (refresh) await refresh(); }, 300);
  };
  const say = (t) => { live.textContent = t; };
  es.addEventListener("round_started", (e) => { const d = JSON.parse(e.data); say(`Round ${d.round} of ${d.total}: ${d.sampled.length} hospitals training…`); kick(); });
  es.addEventListener("round_finished", (e) => {
    const d = JSON.parse(e.data);
    const q = d.accuracy !== undefined ? `accuracy ${fmt(d.accuracy)}` : `AUROC ${fmt(d.auroc_macro)}`;
    say(`Round ${d.round} of ${d.total} finished: ${q}, loss ${fmt(d.loss, 4)}`);
    kick();
  });
  es.addEventListener("update_rejected", (e) => { const d = JSON.parse(e.data); say(`Round ${d.round}: ${d.client} not counted (${d.reason})`); });
  es.addEventListener("client_flagged", (e) => { const d = JSON.parse(e.data); say(`Round ${d.round}: ${d.client} flagged suspicious (trust ${fmt(d.trust_ema, 2)})`); kick(); });
  es.addEventListener("finished", (e) => { const d = JSON.parse(e.data); say(`Training finished after ${d.rounds} rounds.`); kick(); });
  es.addEventListener("failed", (e) => { const d = JSON.parse(e.data); say(`Training failed: ${d.error}`); kick(); });
  // Queued runs start, and stopped ones end, between events: the runs
  // page also looks every few seconds.
  // The hospitals page follows the heartbeats the same way.
  setInterval(() => { if (location.hash.startsWith("#/runs") || location.hash === "#/clients") kick(); }, 3000);
}

main();
