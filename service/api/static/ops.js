// Flywheel ops page: plain JS, no build step, no third-party code. Every piece of data comes
// from the API with the pasted key; data goes into the DOM as text nodes, never as HTML.
"use strict";

(() => {
  const KEY_STORE = "flywheel.opsKey";
  // Runs in these states change on their own: poll fast while any is on screen.
  const ACTIVE = new Set(["pending", "training", "evaluating", "approved", "deploying"]);
  const FAST_MS = 1500;
  const SLOW_MS = 10000;
  const NEEDS_OPS = "This page needs an ops key.";
  const PALETTE = ["#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2", "#65a30d",
                   "#dc2626"];
  const BASE_COLOR = "#6b7280";

  const S = { key: null, me: null, runs: [], adapters: [], runId: null, alias: null,
              timer: null, inflight: null, again: false, busy: false, pinned: false,
              session: 0 };  // bumped at sign-out: answers to an older session are dropped

  const $ = (id) => document.getElementById(id);

  // --- DOM helpers -------------------------------------------------------------------------

  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    append(el, kids);
    return el;
  }

  const SVG_NS = "http://www.w3.org/2000/svg";

  function s(tag, attrs, ...kids) {
    const el = document.createElementNS(SVG_NS, tag);
    setAttrs(el, attrs);
    append(el, kids);
    return el;
  }

  function setAttrs(el, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") el.textContent = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
  }

  function append(el, kids) {
    for (const kid of kids.flat(Infinity)) {
      if (kid === null || kid === undefined || kid === false) continue;
      el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    }
  }

  function fill(el, ...kids) {
    el.replaceChildren();
    append(el, kids);
  }

  // --- formatting --------------------------------------------------------------------------

  function num(v, digits = 3) {
    if (v === null || v === undefined || Number.isNaN(Number(v))) return "—";
    const n = Number(v);
    return Number.isInteger(n) ? String(n) : n.toFixed(digits);
  }

  // Metrics keep their decimals (1.00, not 1) so a column reads evenly.
  const fixed = (v, digits) => (v === null || v === undefined ? "—" : Number(v).toFixed(digits));

  const pct = (v) => (v === null || v === undefined ? "—" : `${Math.round(v * 100)}%`);
  const short = (id) => String(id || "").slice(0, 8);
  const stamp = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
  const clock = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });

  function ago(iso) {
    if (!iso) return "—";
    const s = Math.max(0, (Date.now() - new Date(iso).getTime()) / 1000);
    if (s < 60) return `${Math.round(s)} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 86400) return `${Math.round(s / 3600)} h ago`;
    return `${Math.round(s / 86400)} d ago`;
  }

  function when(iso) {
    return iso ? h("time", { datetime: iso, title: stamp.format(new Date(iso)), text: ago(iso) })
               : "—";
  }

  function duration(sec) {
    if (sec === null || sec === undefined) return "—";
    if (sec < 60) return `${Math.round(sec)} s`;
    if (sec < 3600) return `${Math.floor(sec / 60)} min ${Math.round(sec % 60)} s`;
    return `${Math.floor(sec / 3600)} h ${Math.round((sec % 3600) / 60)} min`;
  }

  const label = (state) => String(state).replace(/_/g, " ");

  function badge(state) {
    return h("span", { class: `badge st-${state}`, "data-testid": "state-badge", text: label(state) });
  }

  function versionColors(names) {
    const colors = new Map();
    let i = 0;
    for (const name of names) {
      if (colors.has(name)) continue;
      colors.set(name, name === "base" || name === "the base model" ? BASE_COLOR
                                                                    : PALETTE[i++ % PALETTE.length]);
    }
    return colors;
  }

  // --- API -----------------------------------------------------------------------------------

  class ApiFailure extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(path, { method = "GET", body } = {}) {
    const headers = { Authorization: `Bearer ${S.key}`, Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let r;
    try {
      r = await fetch(path, { method, headers, cache: "no-store", credentials: "omit",
                              body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (e) {
      throw new ApiFailure(0, "the API is unreachable");
    }
    let data = null;
    try {
      data = await r.json();
    } catch (e) {
      data = null;
    }
    if (!r.ok) {
      const msg = (data && data.error && data.error.message) || `HTTP ${r.status}`;
      throw new ApiFailure(r.status, msg);
    }
    return data;
  }

  function authMessage(err) {
    if (err.status === 403) return `${NEEDS_OPS} The API refused this key: ${err.message}.`;
    if (err.status === 401) return `This key was not accepted (${err.message}). ${NEEDS_OPS}`;
    return `Could not sign in: ${err.message}.`;
  }

  // --- login / logout ----------------------------------------------------------------------

  async function login(key) {
    S.key = key;
    let me;
    try {
      me = await api("/v1/whoami");
    } catch (err) {
      return signOut(authMessage(err));
    }
    if (me.role !== "ops") {
      return signOut(`${NEEDS_OPS} You pasted a ${me.role} key (tenant ${me.tenant}); ` +
                     "product keys can chat and rate but cannot see or decide runs.");
    }
    S.me = me;
    sessionStorage.setItem(KEY_STORE, key);
    fill($("who").querySelector("[data-testid=whoami]"), `tenant ${me.tenant} · ${me.role}`);
    $("login").hidden = true;
    $("app").hidden = false;
    $("nav").hidden = false;
    $("who").hidden = false;
    $("auth-error").hidden = true;
    refresh();
  }

  function signOut(message) {
    S.session += 1;
    S.key = null;
    S.me = null;
    S.runs = [];
    S.adapters = [];
    S.runId = null;
    S.alias = null;
    S.pinned = false;
    clearTimeout(S.timer);
    sessionStorage.removeItem(KEY_STORE);
    // Nothing fetched with the old key stays on the page.
    versionCache.clear();
    lossSeen.clear();
    for (const id of ["aliases-body", "runs-body", "audit-body", "versions-body", "gate-head",
                      "gate-body", "golden-body", "run-facts", "verdict", "dataset-facts",
                      "training-facts", "thumbs-chart", "version-gate-chart", "gate-chart",
                      "loss-chart"]) {
      $(id).replaceChildren();
    }
    $("report-body").hidden = true;
    $("report-empty").hidden = false;
    $("decision-actions").hidden = true;
    $("alias-detail").hidden = true;
    $("app").hidden = true;
    $("nav").hidden = true;
    $("who").hidden = true;
    $("login").hidden = false;
    $("key-input").value = "";
    const box = $("auth-error");
    box.hidden = !message;
    box.textContent = message || "";
    $("key-input").focus();
  }

  // --- refresh loop ------------------------------------------------------------------------

  function anyActive() {
    return S.runs.some((r) => ACTIVE.has(r.state));
  }

  function refresh() {
    if (!S.key) return Promise.resolve();
    if (S.inflight) {
      S.again = true;  // one more pass right after this one, with the newest state
      return S.inflight;
    }
    clearTimeout(S.timer);
    S.inflight = refreshOnce().finally(() => {
      S.inflight = null;
      if (!S.key) return;
      if (S.again) {
        S.again = false;
        refresh();
        return;
      }
      const fast = anyActive();
      $("live").classList.toggle("fast", fast);
      S.timer = setTimeout(refresh, fast ? FAST_MS : SLOW_MS);
    });
    return S.inflight;
  }

  async function refreshOnce() {
    const session = S.session;
    try {
      const [adapters, runs, audit] = await Promise.all([
        api("/v1/adapters"), api("/v1/runs?limit=50"), api("/v1/audit?limit=100")]);
      if (!S.key || session !== S.session) return;
      S.adapters = adapters;
      S.runs = runs;
      pickDefaults();
      renderAliases();
      renderRuns();
      renderAudit(audit);
      await Promise.all([S.runId ? loadRun(S.runId) : null, S.alias ? loadAlias(S.alias) : null]);
      $("banner").hidden = true;
    } catch (err) {
      if (session !== S.session) return;
      if (err.status === 401 || err.status === 403) return signOut(authMessage(err));
      showBanner(`Could not refresh: ${err.message}. Retrying…`);
    }
  }

  function pickDefaults() {
    if (S.alias && !S.adapters.some((a) => a.alias === S.alias)) S.alias = null;
    if (!S.alias && S.adapters.length) S.alias = S.adapters[0].alias;
    if (S.runId && !S.runs.some((r) => r.id === S.runId)) S.runId = null;
    if (!S.runId && !S.pinned && S.runs.length) {
      // The run that needs a human comes first; otherwise the newest.
      const waiting = S.runs.find((r) => r.state === "awaiting_approval");
      S.runId = (waiting || S.runs[0]).id;
    }
  }

  function showBanner(text) {
    const b = $("banner");
    b.textContent = text;
    b.hidden = false;
  }

  // --- aliases -----------------------------------------------------------------------------

  function renderAliases() {
    fill($("aliases-count"), `${S.adapters.length} alias${S.adapters.length === 1 ? "" : "es"}`);
    const rows = S.adapters.map((a) => {
      const selected = a.alias === S.alias;
      return h("tr", { "data-testid": "alias-row", "data-alias": a.alias,
                       class: selected ? "selected" : null },
        h("th", { scope: "row" }, a.alias, a.description ? h("div", { class: "muted small", text: a.description }) : null),
        h("td", {}, h("code", { "data-testid": "alias-serving", text: a.serving })),
        h("td", {}, a.canary ? [h("code", { text: a.canary }), ` ${pct(a.canary_share)}`] : "—"),
        h("td", { "data-testid": "alias-previous" }, previousName(a)),
        h("td", { "data-testid": "alias-versions" }, versionChips(a.alias)),
        h("td", { class: "actions-cell" }, h("div", { class: "actions" },
          h("button", { type: "button", "aria-pressed": selected ? "true" : "false",
                        onclick: () => selectAlias(a.alias) }, "Details", srOnly(` of ${a.alias}`)),
          h("button", { type: "button", class: "danger", "data-testid": "rollback-button",
                        disabled: !a.serving_version_id || S.busy,
                        title: a.serving_version_id ? "Serve the previous version (or the base model) again"
                                                    : "Serves the base model: nothing to roll back",
                        onclick: () => askRollback(a) }, "Rollback", srOnly(` ${a.alias}`)))));
    });
    fill($("aliases-body"), rows.length ? rows : emptyRow(6, "No aliases yet."));
  }

  function selectAlias(alias) {
    S.alias = alias;
    renderAliases();
    loadAlias(alias).catch((err) => showBanner(`Could not load ${alias}: ${err.message}`));
  }

  // The list view carries version ids only; the detail (when loaded) knows their names.
  const versionCache = new Map();

  function previousName(a) {
    if (!a.previous_version_id) return a.serving_version_id ? h("code", { text: "base" }) : "—";
    const v = (versionCache.get(a.alias) || []).find((x) => x.id === a.previous_version_id);
    return v ? h("code", { text: v.lora_name }) : h("span", { class: "muted", text: short(a.previous_version_id) });
  }

  function versionChips(alias) {
    const versions = versionCache.get(alias);
    if (!versions) return h("span", { class: "muted", text: "…" });
    if (!versions.length) return h("span", { class: "muted", text: "base only" });
    return h("ul", { class: "chips" }, versions.map((v) =>
      h("li", { class: `chip vs-${v.status}`, title: `${v.lora_name}: ${v.status}` },
        `v${v.number} `, h("span", { class: "small", text: v.status }),
        ` · ${v.thumbs_up} up · ${v.thumbs_down} down`)));
  }

  function loadAliasDetails() {
    // Every alias's versions, for the chips: a handful of aliases per tenant, so one call each.
    return Promise.all(S.adapters.map((a) => api(`/v1/adapters/${encodeURIComponent(a.alias)}`)));
  }

  async function loadAlias(alias) {
    const [range, bucket] = $("stats-range").value.split(":");
    const enc = encodeURIComponent(alias);
    const session = S.session;
    const [details, stats] = await Promise.all([
      loadAliasDetails(), api(`/v1/adapters/${enc}/stats?hours=${range}&bucket_minutes=${bucket}`)]);
    if (!S.key || session !== S.session || S.alias !== alias) return;
    for (const d of details) versionCache.set(d.alias, d.versions);
    const detail = details.find((d) => d.alias === alias);
    if (!detail) return;
    renderAliases();
    renderAliasDetail(detail, stats);
  }

  function renderAliasDetail(detail, stats) {
    $("alias-detail").hidden = false;
    fill($("alias-detail-title"), `${detail.alias}: versions and feedback`);
    const names = ["base", ...detail.versions.map((v) => v.lora_name)];
    const colors = versionColors(names);
    const gateByVersion = new Map();
    for (const r of S.runs) {
      if (r.alias === detail.alias && r.candidate_version && r.metrics && r.metrics.gate) {
        if (!gateByVersion.has(r.candidate_version)) gateByVersion.set(r.candidate_version, r.metrics.gate);
      }
    }
    fill($("versions-body"), detail.versions.length ? detail.versions.slice().reverse().map((v) => {
      const g = gateByVersion.get(v.lora_name) || {};
      const n = v.thumbs_up + v.thumbs_down;
      return h("tr", { "data-testid": "version-row" },
        h("th", { scope: "row" }, swatch(colors.get(v.lora_name)), h("code", { text: v.lora_name }),
          v.lora_name === detail.serving ? h("span", { class: "tag", text: "serving" }) : null,
          v.lora_name === detail.canary ? h("span", { class: "tag", text: "canary" }) : null),
        h("td", {}, h("span", { class: `badge vs-${v.status}`, text: v.status })),
        h("td", { class: "num", text: v.thumbs_up }),
        h("td", { class: "num", text: v.thumbs_down }),
        h("td", { class: "num", text: n ? pct(v.thumbs_up / n) : "—" }),
        h("td", { class: "num", text: fixed(g.preference_accuracy, 2) }),
        h("td", { class: "num", text: fixed(g.reward_margin, 3) }),
        h("td", {}, when(v.created_at)),
        h("td", {}, when(v.promoted_at)));
    }) : emptyRow(9, "No trained versions yet: the alias serves the base model."));

    const series = Object.entries(stats.series || {}).map(([name, points]) => ({
      name, color: colors.get(name) || PALETTE[0],
      points: points.map((p) => ({ x: new Date(p.t).getTime(), y: p.rate,
                                   tip: `${name}: ${pct(p.rate)} of ${p.n} (${stamp.format(new Date(p.t))})` })),
    }));
    lineChart($("thumbs-chart"), series, {
      yMin: 0, yMax: 1, yFmt: pct, xFmt: (t) => clock.format(new Date(t)),
      empty: `No feedback in this range (${stats.feedback || 0} ratings).`,
      title: `Thumbs-up rate over time for ${detail.alias}, one line per version`,
    });

    const groups = detail.versions.filter((v) => gateByVersion.has(v.lora_name)).map((v) => {
      const g = gateByVersion.get(v.lora_name);
      return { label: `v${v.number}`, bars: [
        { name: "candidate", value: g.nll_candidate, color: colors.get(v.lora_name) },
        { name: "reference", value: g.nll_reference, color: "#9ca3af" },
        { name: "base", value: g.nll_base, color: "#d1d5db" }] };
    });
    barChart($("version-gate-chart"), groups, {
      empty: "No gate results for this alias's versions yet.",
      title: `Gate NLL per version of ${detail.alias}`,
      // Candidate bars take their version's colour, as in the thumbs-up chart.
      legend: [{ name: "candidate (version colour)", color: PALETTE[0] },
               { name: "reference", color: "#9ca3af" }, { name: "base", color: "#d1d5db" }],
    });
  }

  function swatch(color) {
    const el = h("span", { class: "swatch", "aria-hidden": "true" });
    el.style.background = color || BASE_COLOR;
    return el;
  }

  function srOnly(text) {
    return h("span", { class: "sr-only", text });
  }

  function emptyRow(cols, text) {
    return h("tr", {}, h("td", { colspan: cols, class: "muted empty", text }));
  }

  // --- runs --------------------------------------------------------------------------------

  function renderRuns() {
    const waiting = S.runs.filter((r) => r.state === "awaiting_approval").length;
    fill($("runs-count"), `${S.runs.length} run${S.runs.length === 1 ? "" : "s"}` +
                           (waiting ? ` · ${waiting} awaiting approval` : ""));
    const rows = S.runs.map((r) => h("tr", {
      "data-testid": "run-row", "data-run-id": r.id, "data-state": r.state,
      class: [r.id === S.runId ? "selected" : "", r.state === "awaiting_approval" ? "attention" : ""].join(" ").trim() || null },
      h("td", {}, when(r.created_at)),
      h("td", {}, r.alias),
      h("td", {}, badge(r.state)),
      h("td", {}, r.method || "—"),
      h("td", { class: "progress-cell" }, progressView(r)),
      h("td", { "data-testid": "run-gate" }, gateSummary(r)),
      h("td", {}, r.candidate_version ? h("code", { text: r.candidate_version }) : "—"),
      h("td", { class: "actions-cell" }, h("div", { class: "actions" }, h("button", {
        type: "button", "data-testid": "open-run", onclick: () => selectRun(r.id) },
        r.state === "awaiting_approval" ? "Review" : "Report", srOnly(` run ${short(r.id)} of ${r.alias}`))))));
    fill($("runs-body"), rows.length ? rows : emptyRow(8, "No runs yet: they start when an alias collects enough ratings."));
  }

  function progressView(r) {
    const p = r.progress || {};
    if (p.total_steps) {
      const done = Math.min(p.step || 0, p.total_steps);
      const bar = h("div", { class: "bar", role: "progressbar", "aria-valuemin": 0,
                             "aria-valuemax": p.total_steps, "aria-valuenow": done,
                             "aria-label": `Training step ${done} of ${p.total_steps}` });
      const fillEl = h("div", { class: "bar-fill" });
      fillEl.style.width = `${(100 * done) / p.total_steps}%`;
      bar.append(fillEl);
      const bits = [`${done}/${p.total_steps}`];
      if (p.loss !== undefined && p.loss !== null) bits.push(`loss ${num(p.loss, 3)}`);
      if (r.state === "training" && p.eta_s !== undefined && p.eta_s !== null) bits.push(`ETA ${duration(p.eta_s)}`);
      return h("div", { "data-testid": "run-progress" }, bar, h("div", { class: "small", text: bits.join(" · ") }));
    }
    if (p.deployed_at) return h("span", { class: "small" }, "deployed ", when(p.deployed_at));
    if (r.state === "pending") return h("span", { class: "muted small", text: "queued" });
    if (r.state === "training") return h("span", { class: "muted small", text: "preparing data…" });
    return h("span", { class: "muted", text: "—" });
  }

  function gateSummary(r) {
    const g = (r.metrics || {}).gate;
    if (!g) return h("span", { class: "muted", text: "—" });
    const v = r.verdict || {};
    const mark = v.passed === true ? h("span", { class: "ok", text: "✓ passed" })
               : v.passed === false ? h("span", { class: "bad", text: "✗ failed" }) : null;
    if (g.preference_accuracy === undefined && g.nll_candidate === undefined) {
      return h("div", { class: "small" }, mark, h("div", { class: "muted", text: "no held-out metrics" }));
    }
    return h("div", { class: "small" }, mark,
      h("div", {}, `pref. acc ${fixed(g.preference_accuracy, 2)} · margin ${fixed(g.reward_margin, 2)}`),
      h("div", {}, `NLL ${fixed(g.nll_candidate, 3)} vs ${fixed(g.nll_reference, 3)}`));
  }

  function selectRun(id) {
    S.runId = id;
    S.pinned = true;
    renderRuns();
    loadRun(id).catch((err) => showBanner(`Could not load run: ${err.message}`));
    $("report").scrollIntoView({ behavior: "smooth", block: "start" });
  }

  async function loadRun(id) {
    const session = S.session;
    const run = await api(`/v1/runs/${encodeURIComponent(id)}`);
    if (!S.key || session !== S.session || S.runId !== id) return;
    renderReport(run);
  }

  function renderReport(run) {
    $("report-empty").hidden = true;
    $("report-body").hidden = false;
    $("report-body").dataset.runId = run.id;
    $("report-body").dataset.state = run.state;
    fill($("report-title"), "Eval report ", h("span", { class: "muted", text: `run ${short(run.id)}` }));
    const waiting = run.state === "awaiting_approval";
    $("decision-actions").hidden = !waiting;
    $("approve").disabled = S.busy;
    $("reject").disabled = S.busy;
    $("approve").onclick = () => askDecision(run, true);
    $("reject").onclick = () => askDecision(run, false);

    const lin = run.lineage || {};
    const facts = [
      ["Alias", run.alias],
      ["State", badge(run.state)],
      ["Method", run.method ? `${run.method}${run.method_reason ? ` (${run.method_reason})` : ""}` : "—"],
      ["Candidate", run.candidate_version ? h("code", { text: run.candidate_version }) : "—"],
      ["Compared with", h("code", { text: run.parent_version || "base" })],
      ["Created", when(run.created_at)],
      ["Finished", when(run.finished_at)],
      ["Worker claims", run.attempts],
      ["Dataset sha256", lin.dataset && lin.dataset.sha256 ? h("code", { title: lin.dataset.sha256, text: short(lin.dataset.sha256) }) : "—"],
      ["Artifact sha256", lin.sha256 ? h("code", { title: lin.sha256, text: short(lin.sha256) }) : "—"],
    ];
    if (run.failure_reason) facts.push(["Failure", h("span", { class: "bad", text: run.failure_reason })]);
    fill($("run-facts"), facts.map(([k, v]) => [h("dt", { text: k }), h("dd", {}, v)]));

    renderVerdict(run);
    renderGate(run);
    renderLoss(run);
    renderGolden(run);
    renderDataset(run.dataset_stats || {});
  }

  function renderVerdict(run) {
    const v = run.verdict || {};
    const box = $("verdict");
    if (v.passed === undefined) {
      fill(box, h("p", { class: "muted", text: "The gate has not decided yet." }));
      return;
    }
    const reasons = v.reasons || [];
    const notes = v.notes || [];
    fill(box,
      h("p", { class: `verdict ${v.passed ? "ok" : "bad"}`, "data-testid": "verdict-headline",
               text: v.passed ? "✓ Gate passed" : "✗ Gate failed" }),
      reasons.length ? h("ul", { class: "reasons", "data-testid": "verdict-reasons" },
                         reasons.map((r) => h("li", { text: r }))) : null,
      notes.length ? h("ul", { class: "notes muted" }, notes.map((n) => h("li", { text: n }))) : null,
      v.watch ? h("p", { class: "small" }, h("strong", { text: "Watch window: " }),
                  typeof v.watch === "string" ? v.watch : JSON.stringify(v.watch)) : null);
  }

  function renderGate(run) {
    const g = (run.metrics || {}).gate;
    const cand = run.candidate_version || "candidate";
    const ref = run.parent_version || "base";
    fill($("gate-head"), h("tr", {},
      h("th", { scope: "col", text: "Metric" }),
      h("th", { scope: "col" }, "Candidate", h("div", { class: "small muted", text: cand })),
      h("th", { scope: "col" }, "Reference", h("div", { class: "small muted", text: ref })),
      h("th", { scope: "col", text: "Base" })));
    if (!g || !Object.keys(g).length) {
      fill($("gate-body"), emptyRow(4, "No gate metrics yet."));
      $("gate-chart").replaceChildren();
      return;
    }
    const row = (name, c, r, b, help) => h("tr", {},
      h("th", { scope: "row" }, name, help ? h("div", { class: "small muted", text: help }) : null),
      h("td", { class: "num", text: c }), h("td", { class: "num", text: r }),
      h("td", { class: "num", text: b }));
    fill($("gate-body"),
      row("Preference accuracy", fixed(g.preference_accuracy, 2), "—", "—",
          `share of ${g.n_preference ?? 0} held-out comparisons the candidate orders right`),
      row("Reward margin", fixed(g.reward_margin, 3), "—", "—", "mean implied-reward margin over them"),
      row("NLL, good answers", fixed(g.nll_candidate, 3), fixed(g.nll_reference, 3), fixed(g.nll_base, 3),
          `${g.n_nll ?? 0} answers, lower is better`));
    barChart($("gate-chart"), [{ label: "NLL on good held-out answers", bars: [
      { name: `candidate ${cand}`, value: g.nll_candidate, color: PALETTE[0] },
      { name: `reference ${ref}`, value: g.nll_reference, color: "#9ca3af" },
      { name: "base", value: g.nll_base, color: "#d1d5db" }] }],
      { empty: "No NLL measured.", title: "NLL of candidate, reference and base" });
  }

  // The deploy step replaces a run's progress (and its loss history): keep what this tab saw.
  const lossSeen = new Map();

  function renderLoss(run) {
    let history = (run.progress || {}).loss_history || [];
    if (history.length) lossSeen.set(run.id, history);
    else history = lossSeen.get(run.id) || [];
    const t = (run.metrics || {}).training || {};
    lineChart($("loss-chart"), history.length ? [{
      name: "loss", color: PALETTE[0],
      points: history.map(([step, loss]) => ({ x: step, y: loss, tip: `step ${step}: loss ${num(loss, 4)}` })),
    }] : [], {
      yMin: 0, xFmt: (x) => String(Math.round(x)), yFmt: (y) => num(y, 2), xLabel: "step",
      empty: t.final_loss !== undefined ? `No loss history kept for this run (final loss ${num(t.final_loss, 4)}).`
                                        : "No training loss reported yet.",
      title: "Training loss by step", legend: false,
    });
    const facts = [["Steps", t.steps], ["Train loss", num(t.train_loss, 4)],
                   ["Final loss", num(t.final_loss, 4)], ["Tokens", t.tokens],
                   ["Tokens/s", num(t.tokens_per_s, 1)], ["Time", duration(t.seconds)],
                   ["Processes", t.world_size]].filter(([, v]) => v !== undefined && v !== "—");
    fill($("training-facts"), facts.map(([k, v]) => [h("dt", { text: k }), h("dd", { text: v })]));
  }

  function renderGolden(run) {
    let cases = (run.eval_results || []).filter((e) => e.metric === "golden" && e.detail).map((e) => e.detail);
    if (!cases.length) cases = (run.metrics || {}).golden || [];
    fill($("golden-body"), cases.length ? cases.map((c) => h("tr", {},
      h("td", {}, h("span", { class: c.passed ? "ok" : "bad", text: c.passed ? "✓ pass" : "✗ fail" })),
      h("td", { text: c.prompt }),
      h("td", {}, h("code", { class: "wrap", text: c.output })),
      h("td", { text: (c.failures || []).join("; ") || "—" })))
      : emptyRow(4, "No golden suite configured for this alias."));
  }

  function renderDataset(stats) {
    const entries = Object.entries(stats);
    if (!entries.length) {
      fill($("dataset-facts"), h("dt", { text: "Dataset" }), h("dd", { class: "muted", text: "not built yet" }));
      return;
    }
    fill($("dataset-facts"), entries.map(([k, v]) => [
      h("dt", { text: label(k) }),
      h("dd", {}, Array.isArray(v) ? (v.length ? v.join("; ") : "none")
                  : typeof v === "string" && v.length > 16 ? h("code", { title: v, text: short(v) })
                  : typeof v === "object" && v !== null ? JSON.stringify(v) : num(v, 3))]));
  }

  // --- audit -------------------------------------------------------------------------------

  function renderAudit(events) {
    fill($("audit-body"), events.length ? events.map((e) => {
      const detail = e.detail && Object.keys(e.detail).length ? e.detail : null;
      return h("tr", { "data-testid": "audit-row", "data-action": e.action },
        h("td", {}, when(e.created_at)),
        h("td", {}, h("code", { text: e.actor })),
        h("td", {}, h("code", { text: e.action })),
        h("td", { text: `${e.target_type} ${short(e.target_id)}`, title: e.target_id }),
        h("td", { text: e.reason || "—" }),
        h("td", {}, detail ? h("details", {}, h("summary", { text: "show" }),
                                 h("pre", { text: JSON.stringify(detail, null, 2) })) : "—"));
    }) : emptyRow(6, "No audit events yet."));
  }

  // --- decisions ---------------------------------------------------------------------------

  function askDecision(run, approve) {
    const verb = approve ? "Approve" : "Reject";
    confirmDialog({
      title: `${verb} ${run.candidate_version || "this candidate"}?`,
      text: approve ? `The worker will deploy it and ${run.alias} will switch to it.`
                    : `${run.alias} keeps serving ${run.parent_version || "the base model"}.`,
      confirm: verb, busy: approve ? "Approving…" : "Rejecting…", danger: !approve,
      act: (reason) => api(`/v1/runs/${encodeURIComponent(run.id)}/${approve ? "approve" : "reject"}`,
                           { method: "POST", body: { reason } }),
    });
  }

  function askRollback(a) {
    confirmDialog({
      title: `Roll back ${a.alias}?`,
      text: `${a.alias} stops serving ${a.serving} and serves its previous version ` +
            "(or the base model) again.",
      confirm: "Roll back", busy: "Rolling back…", danger: true,
      act: (reason) => api(`/v1/adapters/${encodeURIComponent(a.alias)}/rollback`,
                           { method: "POST", body: { reason } }),
    });
  }

  let pending = null;

  function confirmDialog(opts) {
    pending = opts;
    fill($("confirm-title"), opts.title);
    fill($("confirm-text"), opts.text);
    $("confirm-reason").value = "";
    $("confirm-error").hidden = true;
    const ok = $("confirm-ok");
    ok.textContent = opts.confirm;
    ok.className = opts.danger ? "danger" : "primary";
    ok.disabled = false;
    $("confirm-cancel").disabled = false;
    $("confirm").showModal();
    $("confirm-reason").focus();
  }

  function setBusy(busy) {
    S.busy = busy;
    for (const b of document.querySelectorAll("[data-testid=rollback-button], #approve, #reject")) {
      if (busy) b.disabled = true;
    }
    if (!busy) renderAliases();
    $("confirm-ok").disabled = busy;
    $("confirm-cancel").disabled = busy;
  }

  async function onConfirm(ev) {
    ev.preventDefault();  // the dialog stays open until the API has answered
    if (!pending || S.busy) return;
    const reason = $("confirm-reason").value.trim();
    if (!reason) {
      showConfirmError("Please give a reason: it goes into the audit log.");
      return;
    }
    const opts = pending;
    setBusy(true);
    $("confirm-ok").textContent = opts.busy;
    $("confirm-error").hidden = true;
    try {
      await opts.act(reason);
      pending = null;
      $("confirm").close();
    } catch (err) {
      const prefix = err.status === 403 ? `${NEEDS_OPS} ` : "";
      showConfirmError(`${prefix}The API refused: ${err.message}${err.status ? ` (HTTP ${err.status})` : ""}`);
      $("confirm-ok").textContent = opts.confirm;
    } finally {
      setBusy(false);
      $("approve").disabled = false;
      $("reject").disabled = false;
    }
    refresh();
  }

  function showConfirmError(text) {
    const box = $("confirm-error");
    box.textContent = text;
    box.hidden = false;
  }

  // --- charts (inline SVG) -----------------------------------------------------------------

  const W = 520;
  const H = 220;
  const M = { l: 44, r: 12, t: 12, b: 28 };

  function ticks(lo, hi, n) {
    if (hi === lo) return [lo];
    const raw = (hi - lo) / n;
    const mag = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) out.push(+v.toFixed(10));
    return out;
  }

  function frame(title) {
    return s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title,
                      preserveAspectRatio: "xMidYMid meet" }, s("title", { text: title }));
  }

  function lineChart(el, series, o) {
    const pts = series.flatMap((sr) => sr.points.filter((p) => p.y !== null && p.y !== undefined));
    if (!pts.length) {
      fill(el, h("p", { class: "muted chart-empty", text: o.empty }));
      return;
    }
    let x0 = Math.min(...pts.map((p) => p.x));
    let x1 = Math.max(...pts.map((p) => p.x));
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    const y0 = o.yMin ?? Math.min(...pts.map((p) => p.y));
    let y1 = o.yMax ?? Math.max(...pts.map((p) => p.y)) * 1.08;
    if (y1 === y0) y1 = y0 + 1;
    const sx = (x) => M.l + ((x - x0) / (x1 - x0)) * (W - M.l - M.r);
    const sy = (y) => H - M.b - ((y - y0) / (y1 - y0)) * (H - M.t - M.b);
    const svg = frame(o.title);
    svg.append(axes(sx, sy, [x0, x1], [y0, y1], o));
    for (const sr of series) {
      const ps = sr.points.filter((p) => p.y !== null && p.y !== undefined);
      if (ps.length > 1) {
        svg.append(s("polyline", { fill: "none", stroke: sr.color, "stroke-width": 2,
                                   "stroke-linejoin": "round",
                                   points: ps.map((p) => `${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join(" ") }));
      }
      for (const p of ps) {
        svg.append(s("circle", { cx: sx(p.x).toFixed(1), cy: sy(p.y).toFixed(1), r: 3.5,
                                 fill: sr.color }, s("title", { text: p.tip })));
      }
    }
    fill(el, svg, o.legend === false ? null : legend(series));
  }

  function axes(sx, sy, [x0, x1], [y0, y1], o) {
    const g = s("g", { class: "axes" });
    for (const y of ticks(y0, y1, 4)) {
      g.append(s("line", { x1: M.l, x2: W - M.r, y1: sy(y), y2: sy(y), class: "grid" }),
               s("text", { x: M.l - 6, y: sy(y) + 4, "text-anchor": "end", text: o.yFmt(y) }));
    }
    const xs = o.xLabel === "step" ? ticks(x0, x1, 5).filter((x) => Number.isInteger(x))
                                   : [x0, (x0 + x1) / 2, x1];
    xs.forEach((x, i) => {
      // Time labels are wide: the outer ones hang inwards so the frame never clips them.
      const anchor = o.xLabel === "step" || xs.length < 2 ? "middle"
        : i === 0 ? "start" : i === xs.length - 1 ? "end" : "middle";
      g.append(s("text", { x: sx(x), y: H - M.b + 16, "text-anchor": anchor, text: o.xFmt(x) }));
    });
    g.append(s("line", { x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b, class: "axis" }));
    if (o.xLabel) g.append(s("text", { x: W - M.r, y: H - 2, "text-anchor": "end", class: "label", text: o.xLabel }));
    return g;
  }

  function barChart(el, groups, o) {
    const vals = groups.flatMap((g) => g.bars.map((b) => b.value)).filter((v) => v !== null && v !== undefined);
    if (!vals.length) {
      fill(el, h("p", { class: "muted chart-empty", text: o.empty }));
      return;
    }
    const y1 = Math.max(...vals) * 1.1 || 1;
    const sy = (y) => H - M.b - (y / y1) * (H - M.t - M.b);
    const svg = frame(o.title);
    svg.append(axes(() => 0, sy, [0, 1], [0, y1], { yFmt: (y) => num(y, 1), xFmt: () => "" }));
    const gw = (W - M.l - M.r) / groups.length;
    groups.forEach((g, i) => {
      const n = g.bars.length;
      const bw = Math.min(48, (gw * 0.8) / n);
      const start = M.l + i * gw + (gw - bw * n) / 2;
      g.bars.forEach((b, j) => {
        if (b.value === null || b.value === undefined) return;
        const x = start + j * bw;
        svg.append(s("rect", { x: x + 2, y: sy(b.value), width: bw - 4, height: H - M.b - sy(b.value),
                               fill: b.color, rx: 2 }, s("title", { text: `${g.label} · ${b.name}: ${num(b.value, 3)}` })),
                   s("text", { x: x + bw / 2, y: sy(b.value) - 4, "text-anchor": "middle",
                               class: "value", text: num(b.value, 2) }));
      });
      svg.append(s("text", { x: M.l + i * gw + gw / 2, y: H - M.b + 16, "text-anchor": "middle",
                             class: "group", text: g.label }));
    });
    fill(el, svg, legend(o.legend || groups[0].bars.map((b) => ({ name: b.name, color: b.color }))));
  }

  function legend(items) {
    return h("ul", { class: "legend" }, items.map((it) => h("li", {}, swatch(it.color), it.name)));
  }

  // --- wiring ------------------------------------------------------------------------------

  function init() {
    $("login-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const key = $("key-input").value.trim();
      $("key-input").value = "";
      if (key) login(key);
    });
    $("logout").addEventListener("click", () => signOut(""));
    $("confirm-form").addEventListener("submit", onConfirm);
    $("confirm-cancel").addEventListener("click", () => { pending = null; $("confirm").close(); });
    $("confirm").addEventListener("cancel", (ev) => { if (S.busy) ev.preventDefault(); });
    $("stats-range").addEventListener("change", () => { if (S.alias) loadAlias(S.alias).catch(() => {}); });
    const saved = sessionStorage.getItem(KEY_STORE);
    if (saved) login(saved);
    else $("key-input").focus();
  }

  document.addEventListener("DOMContentLoaded", init);
})();
