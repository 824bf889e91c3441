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
  // The AI judge's line in the thumbs-up chart: its own colour (no version has it), dashed.
  const JUDGE_COLOR = "#9333ea";

  const S = { key: null, me: null, runs: [], adapters: [], runId: null, alias: null,
              timer: null, inflight: null, again: false, busy: false, pinned: false,
              detail: null, exportOpen: null, exportJust: null, exporting: false,
              imports: null,  // { alias, list } of the selected alias (list: array or { failed })
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
    S.detail = null;
    S.imports = null;
    clearTimeout(S.timer);
    sessionStorage.removeItem(KEY_STORE);
    // Nothing fetched with the old key stays on the page.
    lossSeen.clear();
    exportDetails.clear();
    downloading.clear();
    resetExportForm();
    for (const id of ["aliases-body", "runs-body", "audit-body", "versions-body", "gate-head",
                      "gate-body", "golden-body", "run-facts", "verdict", "dataset-facts",
                      "training-facts", "thumbs-chart", "version-gate-chart", "gate-chart",
                      "loss-chart", "exports-body", "imports-body", "judge-body",
                      "replicas-body", "discovery", "replicas-count"]) {
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
    if (S.runs.some((r) => ACTIVE.has(r.state))) return true;
    // Only the selected alias's exports are on screen (and fetched).
    const exports = S.detail && S.detail.alias === S.alias ? S.detail.exports : null;
    if (Array.isArray(exports) && exports.some((e) => EXPORT_ACTIVE.has(e.status))) return true;
    const imports = S.imports && S.imports.alias === S.alias ? S.imports.list : null;
    return Array.isArray(imports) && imports.some((j) => j.status === "running");
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
      const [adapters, runs, audit, replicas] = await Promise.all([
        api("/v1/adapters"), api("/v1/runs?limit=50"), api("/v1/audit?limit=100"),
        soft(api("/v1/replicas"))]);
      if (!S.key || session !== S.session) return;
      S.adapters = adapters;
      S.runs = runs;
      pickDefaults();
      renderAliases();
      renderReplicas(replicas);
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
    const before = S.alias;
    if (S.alias && !S.adapters.some((a) => a.alias === S.alias)) S.alias = null;
    if (!S.alias && S.adapters.length) S.alias = S.adapters[0].alias;
    if (before && S.alias !== before) resetExportForm();
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
        h("td", { "data-testid": "alias-versions" }, versionChips(a)),
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
    if (alias !== S.alias) resetExportForm();
    S.alias = alias;
    renderAliases();
    loadAlias(alias).catch((err) => showBanner(`Could not load ${alias}: ${err.message}`));
  }

  function previousName(a) {
    if (!a.previous_version_id) return a.serving_version_id ? h("code", { text: "base" }) : "—";
    return a.previous ? h("code", { text: a.previous })
                      : h("span", { class: "muted", text: short(a.previous_version_id) });
  }

  // The list carries each alias's newest versions (newest first) and how many it has in all.
  function versionChips(a) {
    const versions = a.recent_versions || [];
    if (!versions.length) return h("span", { class: "muted", text: "base only" });
    const older = (a.version_count || 0) - versions.length;
    return h("ul", { class: "chips" }, versions.map((v) =>
      h("li", { class: `chip vs-${v.status}`, title: `${v.lora_name}: ${v.status}` },
        `v${v.number} `, h("span", { class: "small", text: v.status }),
        ` · ${v.thumbs_up} up · ${v.thumbs_down} down`)),
      older > 0 ? h("li", { class: "muted small", "data-testid": "alias-versions-older",
                            title: "Details lists every version", text: `+${older} older` })
                : null);
  }

  // A panel whose data cannot be read says so in place of its content, and the rest of the
  // page still renders; a key the API refuses still signs out.
  function soft(promise) {
    return promise.catch((err) => {
      if (err.status === 401 || err.status === 403) throw err;
      return { failed: `${err.message}${err.status ? ` (HTTP ${err.status})` : ""}` };
    });
  }

  // Only the selected alias's detail is fetched: its versions table, charts, imports, judge and
  // exports.
  async function loadAlias(alias) {
    const [range, bucket] = $("stats-range").value.split(":");
    const enc = encodeURIComponent(alias);
    const session = S.session;
    const [detail, stats, policy, imports, judge] = await Promise.all([
      api(`/v1/adapters/${enc}`),
      api(`/v1/adapters/${enc}/stats?hours=${range}&bucket_minutes=${bucket}`),
      api(`/v1/adapters/${enc}/policy`),
      soft(api(`/v1/adapters/${enc}/imports?limit=${IMPORTS_SHOWN}`)),
      soft(api(`/v1/adapters/${enc}/judge?sweeps=${SWEEPS_SHOWN}`))]);
    if (!S.key || session !== S.session || S.alias !== alias) return;
    renderAliasDetail(detail, stats);
    renderPolicy(policy);
    S.imports = { alias, list: imports };
    renderImports(alias, imports);
    renderJudge(judge);
  }

  // The policy files are re-read by the server when they change, so this follows edits.
  function renderPolicy(p) {
    const pol = p.policy;
    const t = pol.trigger;
    const every = t.max_interval_minutes ? ` or every ${t.max_interval_minutes} min` : "";
    fill($("alias-policy"), [
      "Policy ", h("code", { text: p.sources.length ? p.sources.join(" + ") : "built-in defaults" }),
      `: retrain after ${t.min_new_ratings} new ratings${every} · approval ${pol.approval}`,
      ` · export fallback ${pol.export.fallback ? "on" : "off"}`]);
    // The form starts from the policy's choice until the operator changes it.
    if (!S.fallbackTouched) $("export-fallback").checked = !!pol.export.fallback;
  }

  function renderAliasDetail(detail, stats) {
    S.detail = detail;
    $("alias-detail").hidden = false;
    fill($("alias-detail-title"), `${detail.alias}: versions and feedback`);
    // Versions first, so a version keeps its colour; then the other series (imported ratings,
    // "import:<source>"). The AI judge's series is not a version: it has its own look.
    const seriesNames = Object.keys(stats.series || {}).filter((name) => name !== JUDGE_SERIES);
    const names = ["base", ...detail.versions.map((v) => v.lora_name), ...seriesNames];
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
        h("td", { class: "num" }, String(v.thumbs_up), judgeCount(v, "up")),
        h("td", { class: "num" }, String(v.thumbs_down), judgeCount(v, "down")),
        h("td", { class: "num", text: n ? pct(v.thumbs_up / n) : "—" }),
        h("td", { class: "num", text: fixed(g.preference_accuracy, 2) }),
        h("td", { class: "num", text: fixed(g.reward_margin, 3) }),
        h("td", {}, when(v.created_at)),
        h("td", {}, when(v.promoted_at)));
    }) : emptyRow(9, "No trained versions yet: the alias serves the base model."));

    // The judge's line comes last: drawn on top, and last in the legend.
    const entries = Object.entries(stats.series || {}).sort(
      ([a], [b]) => (a === JUDGE_SERIES) - (b === JUDGE_SERIES));
    const series = entries.map(([name, points]) => {
      const judge = name === JUDGE_SERIES;
      const shown = judge ? "AI judge" : name;
      return {
        name: shown, color: judge ? JUDGE_COLOR : colors.get(name) || PALETTE[0], dash: judge,
        points: points.map((p) => ({ x: new Date(p.t).getTime(), y: p.rate,
                                     tip: `${shown}: ${pct(p.rate)} of ${p.n} (${stamp.format(new Date(p.t))})` })),
      };
    });
    const judged = entries.some(([name]) => name === JUDGE_SERIES);
    lineChart($("thumbs-chart"), series, {
      yMin: 0, yMax: 1, yFmt: pct, xFmt: (t) => clock.format(new Date(t)),
      empty: `No feedback in this range (${stats.feedback || 0} ratings).`,
      title: `Thumbs-up rate over time for ${detail.alias}, one line per version` +
             (judged ? "; the AI judge's ratings as a dashed line of their own" : ""),
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
    renderExports(detail);
  }

  function swatch(color, dashed) {
    const el = h("span", { class: dashed ? "swatch dashed" : "swatch", "aria-hidden": "true" });
    if (dashed) el.style.borderColor = color || BASE_COLOR;
    else el.style.background = color || BASE_COLOR;
    return el;
  }

  // The AI judge's ratings of a version, under the human counts: never in the thumbs-up rate.
  function judgeCount(v, which) {
    if (!v.judge_up && !v.judge_down) return null;
    return h("div", { class: "judge-count", "data-testid": `version-judge-${which}`,
                      title: "The AI judge's ratings, counted apart from the humans' (not in the rate)" },
      srOnly("AI "), `judge ${which === "up" ? v.judge_up : v.judge_down}`);
  }

  function srOnly(text) {
    return h("span", { class: "sr-only", text });
  }

  function emptyRow(cols, text) {
    return h("tr", {}, h("td", { colspan: cols, class: "muted empty", text }));
  }

  // --- feedback imports --------------------------------------------------------------------

  const IMPORTS_SHOWN = 20;
  const IMPORT_COLS = 7;
  const SAMPLES_SHOWN = 3;  // error samples in the row; the rest fold away

  function failedRow(cols, text) {
    return h("tr", {}, h("td", { colspan: cols, class: "empty" }, h("span", { class: "bad", text })));
  }

  function renderImports(alias, list) {
    if (!Array.isArray(list)) {
      rerender($("imports-body"), failedRow(IMPORT_COLS, `Could not load the imports: ${list.failed}.`));
      return;
    }
    rerender($("imports-body"), list.length ? list.map(importRow) : h("tr", {},
      h("td", { colspan: IMPORT_COLS, class: "muted empty" }, "No imports yet: ",
        h("code", { text: `POST /v1/adapters/${alias}/imports?source=…` }), " or ",
        h("code", { text: "flywheel import" }), " adds ratings collected elsewhere.")));
  }

  function importRow(j) {
    const file = [j.file_name || "unnamed file", j.file_bytes ? bytes(j.file_bytes) : null]
      .filter(Boolean).join(" · ");
    return h("tr", { "data-testid": "import-row", "data-import-id": j.id, "data-status": j.status },
      h("th", { scope: "row" }, h("code", { text: j.source }),
        h("div", { class: "small muted file-name", title: j.file_sha256 ? `sha256 ${j.file_sha256}` : null,
                   "data-testid": "import-file", text: file })),
      h("td", {},
        h("span", { class: `badge im-${j.status}`, "data-testid": "import-status", text: label(j.status) }),
        j.failure_reason ? h("div", { class: "small bad failure", "data-testid": "import-failure",
                                      text: j.failure_reason }) : null),
      h("td", { class: "progress-cell", "data-testid": "import-counts" }, importCounts(j)),
      h("td", { "data-testid": "import-skipped" }, reasonChips(j.skipped, j.skipped_reasons)),
      h("td", { class: "samples-cell", "data-testid": "import-errors" }, importErrors(j)),
      h("td", { "data-testid": "import-run" }, importRun(j)),
      h("td", { class: "small" }, when(j.created_at), importTook(j)));
  }

  function importCounts(j) {
    const total = j.total || 0;
    const read = Math.min(j.imported + j.skipped + j.errors, total);
    const line = h("div", {}, h("strong", { text: String(j.imported) }), ` imported of ${total}`);
    if (j.status !== "running") return line;
    return [meter(read, total, `Import progress: ${read} of ${total} records read`),
            line, h("div", { class: "small muted", text: `${read} of ${total} records read` })];
  }

  // A count and its reasons ({reason: n}) as chips; "—" when there are none.
  function reasonChips(count, reasons, testid) {
    const entries = Object.entries(reasons || {}).filter(([, n]) => n);
    if (!count && !entries.length) return h("span", { class: "muted", text: "—" });
    return [count !== null ? h("strong", { text: String(count) }) : null,
      entries.length ? h("ul", { class: "chips reasons-chips", "data-testid": testid || null },
        entries.sort((a, b) => b[1] - a[1]).map(([reason, n]) =>
          h("li", { class: "chip", "data-reason": reason }, `${label(reason)} `, h("strong", { text: String(n) }))))
        : null];
  }

  function importErrors(j) {
    if (!j.errors) return h("span", { class: "muted", text: "—" });
    const samples = j.error_samples || [];
    const item = (e) => h("li", { "data-testid": "import-error-sample" },
      h("code", { text: e.where }), `: ${e.reason}`);
    const rest = samples.slice(SAMPLES_SHOWN);
    const unkept = j.errors - samples.length;
    return [h("strong", { text: String(j.errors) }),
      h("ul", { class: "samples" }, samples.slice(0, SAMPLES_SHOWN).map(item)),
      rest.length ? h("details", { "data-keep": `errors-${j.id}` },
        h("summary", { class: "small", text: `${rest.length} more` }),
        h("ul", { class: "samples" }, rest.map(item))) : null,
      unkept > 0 ? h("div", { class: "small muted", text: `and ${unkept} not kept` }) : null];
  }

  function importRun(j) {
    if (!j.run_id) {
      return h("span", { class: "muted small", text: j.status === "running" ? "—" : "none",
                         title: "An import starts a run when the alias's trigger is reached" });
    }
    const run = S.runs.find((r) => r.id === j.run_id);
    if (!run) return h("code", { title: j.run_id, text: `run ${short(j.run_id)}` });
    return h("div", { class: "run-link" },
      h("button", { type: "button", class: "link", "data-testid": "import-run-link",
                    "data-focus": `import-run-${j.id}`, onclick: () => selectRun(run.id) },
        `run ${short(run.id)}`, srOnly(`, started by the ${j.source} import: open its report`)),
      " ", badge(run.state));
  }

  function importTook(j) {
    if (!j.started_at || !j.finished_at) return null;
    const took = (new Date(j.finished_at).getTime() - new Date(j.started_at).getTime()) / 1000;
    return h("div", { class: "muted", text: `took ${duration(took)}` });
  }

  // A progress bar (role progressbar) of now/max; `full` marks it used up.
  function meter(now, max, ariaLabel, full) {
    const f = max > 0 ? Math.min(Math.max(now / max, 0), 1) : 0;
    const bar = h("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": max,
                           "aria-valuenow": Math.min(now, max), "aria-label": ariaLabel });
    const fillEl = h("div", { class: full ? "bar-fill full" : "bar-fill" });
    fillEl.style.width = `${100 * f}%`;
    bar.append(fillEl);
    return bar;
  }

  // --- AI judge ----------------------------------------------------------------------------

  const SWEEPS_SHOWN = 8;
  const JUDGE_SERIES = "judge";  // the stats series of the judge's ratings (not a version)
  const TRUST_PAIRS = 30;        // below this many answers both rated, agreement says little

  function renderJudge(j) {
    const box = $("judge-body");
    if (j.failed) {
      rerender(box, h("p", { class: "error", text: `Could not load the AI judge: ${j.failed}.` }));
      return;
    }
    const r = j.ratings || {};
    const judged = ((r.judge || {}).up || 0) + ((r.judge || {}).down || 0);
    if (!j.enabled) {
      const kept = judged ? ` Its ${judged} earlier rating${judged === 1 ? " is" : "s are"} kept apart.` : "";
      rerender(box, h("p", { class: "muted", "data-testid": "judge-off" }, j.model
        ? [`The AI judge (${j.model}) is paused: `, h("code", { text: "judge.budget_per_hour" }), " is 0.", kept]
        : ["No AI judge is configured for this alias: set ", h("code", { text: "judge.url" }), " and ",
           h("code", { text: "judge.model" }), " in its policy to turn one on.", kept]));
      return;
    }
    rerender(box, [
      h("div", { class: "grid2 judge-grid" },
        h("div", {}, judgeFacts(j), judgeBudget(j), judgeRatings(r)),
        h("div", {}, judgeAgreement(j.agreement || {}),
          h("div", { class: "small", "data-testid": "judge-skips" },
            h("h4", { text: "Skipped in the last 24 hours" }),
            reasonChips(null, j.skipped_last_day)))),
      judgeSweeps(j.sweeps || [])]);
  }

  function judgeFacts(j) {
    const facts = [
      // Two facts a row: the long ones (model, endpoint) in the first value column.
      ["Model", h("code", { "data-testid": "judge-model", text: j.model })], ["Mode", j.mode],
      ["Endpoint", h("code", { "data-testid": "judge-endpoint", text: j.endpoint || "—" })],
      ["Counts toward trigger", j.counts_toward_trigger ? "yes" : "no"],
      ["Max training share", pct(j.max_share)],
      ["Calibration share", pct(j.calibration_share)],
    ];
    return h("dl", { class: "facts small judge-facts" },
      facts.map(([k, v]) => [h("dt", { text: k }), h("dd", {}, v)]));
  }

  function judgeBudget(j) {
    const used = j.used_last_hour || 0;
    const cap = j.budget_per_hour || 0;
    return h("div", { class: "judge-budget", "data-testid": "judge-budget" },
      h("div", { class: "small" }, h("strong", { text: "Budget this hour: " }),
        `${used} of ${cap} answers sent`, used >= cap ? h("span", { class: "tag warn-tag", text: "used up" }) : null),
      meter(used, cap, `AI judge budget this hour: ${used} of ${cap} answers sent`, used >= cap));
  }

  function judgeRatings(r) {
    const human = r.human || { up: 0, down: 0 };
    const judge = r.judge || { up: 0, down: 0 };
    const rate = (x) => (x.up + x.down ? pct(x.up / (x.up + x.down)) : "—");
    const row = (name, f) => h("tr", {}, h("th", { scope: "row", text: name }),
      h("td", { class: "num", text: f(human) }), h("td", { class: "num", text: f(judge) }));
    return h("table", { class: "compact judge-ratings", "data-testid": "judge-ratings" },
      h("caption", { class: "sr-only", text: "Ratings of this alias's answers, by humans and by the AI judge" }),
      h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "Ratings" }),
        h("th", { scope: "col", class: "num", text: "Human" }),
        h("th", { scope: "col", class: "num", text: "AI judge" }))),
      h("tbody", {},
        row("Thumbs up", (x) => String(x.up)), row("Thumbs down", (x) => String(x.down)),
        row("Up rate", rate)));
  }

  function judgeAgreement(a) {
    const head = h("h4", { text: "Agreement with humans" });
    if (!a.pairs) {
      return [head, h("p", { class: "muted small", "data-testid": "judge-agreement",
        text: "No answer has been rated by both a human and the judge yet: how far to trust it is unknown." })];
    }
    const [lo, hi] = a.interval || [null, null];
    const kappa = a.kappa === null || a.kappa === undefined
      ? "no kappa (both always gave the same rating)" : `kappa ${fixed(a.kappa, 2)}`;
    return [head,
      h("p", { class: "agreement", "data-testid": "judge-agreement" },
        h("strong", { text: `Agrees on ${a.agree} of ${a.pairs}` }),
        ` answers both rated (${pct(a.rate)}`, lo !== null ? `, 95% interval ${pct(lo)}–${pct(hi)}` : "",
        `), ${kappa}.`),
      a.judge_up_rate !== null && a.judge_up_rate !== undefined
        ? h("p", { class: "small muted" }, `On those answers the judge said up ${pct(a.judge_up_rate)} ` +
            `of the time, the humans ${pct(a.human_up_rate)}.`) : null,
      a.pairs < TRUST_PAIRS
        ? h("p", { class: "caution small", "data-testid": "judge-caution" }, h("strong", { text: "Too few to trust: " }),
            `only ${a.pairs} answer${a.pairs === 1 ? "" : "s"} rated by both a human and the judge; ` +
            `the rate means little below ${TRUST_PAIRS}.`) : null];
  }

  function judgeSweeps(sweeps) {
    const head = h("h4", { id: "judge-sweeps-title", text: "Recent sweeps" });
    if (!sweeps.length) return [head, h("p", { class: "muted small", text: "No sweeps yet." })];
    return [head, h("div", { class: "scroll" }, h("table", {
      class: "compact judge-sweeps", "data-testid": "judge-sweeps", "aria-labelledby": "judge-sweeps-title" },
      h("thead", {}, h("tr", {}, ["Started", "Model", "Sent", "Rated (up / down)", "Calibration",
                                  "Skipped", "Outcome"].map((c) => h("th", { scope: "col", text: c })))),
      h("tbody", {}, sweeps.map((w) => h("tr", { "data-testid": "judge-sweep-row", "data-sweep-id": w.id },
        h("td", {}, when(w.started_at)),
        h("td", {}, h("code", { text: w.model }), h("span", { class: "muted small", text: ` ${w.mode}` })),
        h("td", { class: "num", text: String(w.attempted) }),
        h("td", { class: "num", text: `${w.rated} (${w.up} / ${w.down})` }),
        h("td", { class: "num", text: String(w.calibration) }),
        h("td", {}, reasonChips(w.skipped, w.skipped_reasons)),
        h("td", { class: "outcome-cell small" }, sweepOutcome(w)))))))];
  }

  function sweepOutcome(w) {
    const took = w.started_at && w.finished_at
      ? (new Date(w.finished_at).getTime() - new Date(w.started_at).getTime()) / 1000 : null;
    if (w.stopped) return h("span", { class: "bad", "data-testid": "judge-stopped", text: `stopped: ${w.stopped}` });
    if (!w.finished_at) return h("span", { class: "muted", text: "running" });
    return h("span", { text: `finished${took !== null ? ` in ${duration(took)}` : ""}` });
  }

  // --- exports -----------------------------------------------------------------------------

  // An export in these states changes on its own: poll fast while any is known.
  const EXPORT_ACTIVE = new Set(["queued", "running"]);
  const EXPORT_COLS = 8;
  // Above this a download is not hashed in the browser (the whole file would sit in memory twice).
  const VERIFY_MAX_BYTES = 512 * 1024 * 1024;
  // Overridable from the console (and by the browser test, to take the link path on a tiny file).
  const verifyMax = () => window.FLYWHEEL_VERIFY_MAX_BYTES ?? VERIFY_MAX_BYTES;
  const exportDetails = new Map();  // export id -> GET .../exports/{id} (finished exports only)
  const detailLoading = new Set();
  const downloading = new Set();    // "exportId/name" while a download runs

  function bytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let v = Number(n);
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return i === 0 ? `${v} B` : `${v.toFixed(v < 10 ? 2 : 1)} ${units[i]}`;
  }

  function signed(v, digits) {
    if (v === null || v === undefined) return "—";
    const t = Number(v).toFixed(digits);
    return Number(t) === 0 ? (0).toFixed(digits) : `${Number(t) > 0 ? "+" : ""}${t}`;
  }

  function exportFormat(e) {
    if (e.format !== "gguf") return e.format;
    const quant = e.quant || e.requested_quant;
    const asked = e.requested_quant && quant !== e.requested_quant ? ` (asked ${e.requested_quant})` : "";
    return `GGUF ${quant || "?"}${asked}`;
  }

  function exportPath(alias, id) {
    return `/v1/adapters/${encodeURIComponent(alias)}/exports${id ? `/${encodeURIComponent(id)}` : ""}`;
  }

  // Re-rendering a table while it polls must not close what the user opened or drop focus:
  // elements marked data-keep (details) and data-focus (buttons) get their state back.
  function rerender(el, kids) {
    const open = new Set([...el.querySelectorAll("details[data-keep][open]")].map((d) => d.dataset.keep));
    const active = document.activeElement;
    const focus = active && el.contains(active) ? active.dataset.focus : null;
    fill(el, kids);
    for (const d of el.querySelectorAll("details[data-keep]")) if (open.has(d.dataset.keep)) d.open = true;
    if (focus) {
      const again = [...el.querySelectorAll("[data-focus]")].find((x) => x.dataset.focus === focus);
      if (again) again.focus();
    }
  }

  function renderExports(detail) {
    // An older server sends no exports at all (and has no export routes): no section then.
    const supported = Array.isArray(detail.exports);
    $("exports").hidden = !supported;
    if (!supported) {
      $("exports-body").replaceChildren();
      return;
    }
    const serving = detail.versions.find((v) => v.id === detail.serving_version_id);
    $("export-version").placeholder = serving ? `serving (v${serving.number})` : "serving: base model";
    if (S.exportOpen && !detail.exports.some((e) => e.id === S.exportOpen)) S.exportOpen = null;
    const rows = detail.exports.flatMap((e) => [exportRow(detail.alias, e),
      e.id === S.exportOpen ? exportDetailRow(detail.alias, e) : null]);
    rerender($("exports-body"), rows.length ? rows
      : emptyRow(EXPORT_COLS, "No exports yet: request one above."));
  }

  function rerenderExports() {
    if (S.detail && S.detail.alias === S.alias) renderExports(S.detail);
  }

  function exportRow(alias, e) {
    const open = e.id === S.exportOpen;
    return h("tr", { "data-testid": "export-row", "data-export-id": e.id, "data-status": e.status,
                     class: e.id === S.exportJust ? "selected" : null },
      h("th", { scope: "row" }, `v${e.version}`,
        h("div", { class: "small muted" }, h("code", { text: e.lora_name }))),
      h("td", { "data-testid": "export-kind" }, exportFormat(e),
        e.format === "gguf" && e.fallback ? h("div", { class: "small muted", text: "fallback on" }) : null),
      h("td", {}, h("span", { class: `badge ex-${e.status}`, "data-testid": "export-status",
                              text: label(e.status) })),
      h("td", { class: "progress-cell", "data-testid": "export-progress" }, exportProgress(e)),
      h("td", { class: "num", text: bytes(e.bytes) }),
      h("td", {}, e.sha256 ? h("code", { title: e.sha256, text: short(e.sha256) }) : "—"),
      h("td", { class: "outcome-cell" }, exportOutcome(alias, e)),
      h("td", { class: "actions-cell" }, h("div", { class: "actions" },
        h("button", { type: "button", "data-testid": "export-details", "data-focus": `details-${e.id}`,
                      "aria-expanded": open ? "true" : "false",
                      "aria-controls": open ? `export-detail-${e.id}` : null,
                      onclick: () => toggleExport(e.id) },
          open ? "Hide" : "Details", srOnly(` of the ${exportFormat(e)} export of v${e.version}`)),
        ["passed", "failed", "error"].includes(e.status)
          ? h("button", { type: "button", class: "danger", "data-testid": "export-delete",
                          "data-focus": `delete-${e.id}`, onclick: () => deleteExport(alias, e) },
              "Delete files", srOnly(` of the ${exportFormat(e)} export of v${e.version}`))
          : null)));
  }

  // Frees the artifact disk; the record stays (status "deleted") for the audit trail.
  async function deleteExport(alias, e) {
    const what = `${exportFormat(e)} of v${e.version}`;
    if (!window.confirm(`Delete the files of the ${what} export (${bytes(e.bytes)})?`)) return;
    const session = S.session;
    showExportError("");
    try {
      await api(exportPath(alias, e.id), { method: "DELETE", body: { reason: "deleted from the ops page" } });
      if (session !== S.session) return;
      exportDetails.delete(e.id);
      $("export-note").textContent = `Deleted the files of the ${what} export.`;
    } catch (err) {
      if (session !== S.session) return;
      if (err.status === 401) return signOut(authMessage(err));
      showExportError(`The API refused to delete the export: ${err.message}` +
                      `${err.status ? ` (HTTP ${err.status})` : ""}`);
    }
    refresh();
  }

  function exportProgress(e) {
    const p = e.progress || {};
    if (e.status === "queued") {
      return h("span", { class: "muted small" }, "waiting for a worker · requested ", when(e.created_at));
    }
    if (e.status === "running") {
      const f = Math.min(Math.max(Number(p.fraction) || 0, 0), 1);
      const bar = h("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100,
                             "aria-valuenow": Math.round(f * 100),
                             "aria-label": `Export progress${p.stage ? `: ${p.stage}` : ""}` });
      const fillEl = h("div", { class: "bar-fill" });
      fillEl.style.width = `${100 * f}%`;
      bar.append(fillEl);
      const bits = [p.stage || "starting", pct(f)];
      if (p.eta_s !== undefined && p.eta_s !== null) bits.push(`ETA ${duration(p.eta_s)}`);
      if (e.attempts > 1) bits.push(`worker claim ${e.attempts}`);
      return [bar, h("div", { class: "small", text: bits.join(" · ") })];
    }
    const took = e.started_at && e.finished_at
      ? (new Date(e.finished_at).getTime() - new Date(e.started_at).getTime()) / 1000 : null;
    return h("span", { class: "small" }, took !== null ? `took ${duration(took)} · ` : "",
             "finished ", when(e.finished_at));
  }

  function exportOutcome(alias, e) {
    if (e.status === "passed") {
      const files = e.files || [];
      if (!files.length) return h("span", { class: "muted small", text: "no files recorded" });
      const list = h("ul", { class: "files" }, files.map((f) => {
        const key = `${e.id}/${f.name}`;
        const busy = downloading.has(key);
        return h("li", {},
          h("button", { type: "button", class: "download", "data-testid": "export-download",
                        "data-file": f.name, "data-focus": `dl-${key}`,
                        "aria-disabled": busy ? "true" : null,
                        title: `sha256 ${f.sha256}`, onclick: () => downloadFile(alias, e, f) },
            busy ? "Downloading… " : "⬇ ", h("code", { text: f.name }), srOnly(` of v${e.version}, ${exportFormat(e)}`)),
          h("span", { class: "muted small", text: ` ${bytes(f.bytes)}` }));
      }));
      // A merged model has a dozen files: fold them away.
      return files.length > 4
        ? h("details", { "data-keep": `files-${e.id}` }, h("summary", { text: `${files.length} files` }), list)
        : list;
    }
    if (e.status === "failed" || e.status === "error") {
      return h("div", { class: "small" },
        h("div", { class: "bad", "data-testid": "export-failure",
                   text: e.failure_reason || (e.status === "failed" ? "the consistency check failed"
                                                                     : "the export could not be built") }),
        e.suggestion ? h("div", { "data-testid": "export-suggestion" }, `Suggestion: try ${e.suggestion} `,
          h("button", { type: "button", class: "link", "data-focus": `suggest-${e.id}`,
                        onclick: () => prefillExport(e, e.suggestion) },
            "Fill the form", srOnly(` with GGUF ${e.suggestion} for v${e.version}`))) : null);
    }
    return h("span", { class: "muted small", text: `requested by ${e.requested_by}` });
  }

  function toggleExport(id) {
    S.exportOpen = S.exportOpen === id ? null : id;
    rerenderExports();
  }

  function exportDetailRow(alias, e) {
    let body;
    if (EXPORT_ACTIVE.has(e.status)) {
      body = h("p", { class: "muted small", text: "The consistency numbers appear when the export has finished." });
    } else {
      const d = exportDetails.get(e.id);
      if (!d || d.status !== e.status) loadExportDetail(alias, e.id);
      body = !d ? h("p", { class: "muted small", text: "Loading…" })
           : d.error ? h("p", { class: "error", text: `Could not load this export: ${d.error}` })
           : exportMetrics(d);
    }
    return h("tr", { class: "detail-row", id: `export-detail-${e.id}`, "data-testid": "export-detail" },
      h("td", { colspan: EXPORT_COLS }, body));
  }

  function loadExportDetail(alias, id) {
    if (detailLoading.has(id)) return;
    detailLoading.add(id);
    const session = S.session;
    api(exportPath(alias, id))
      .then((d) => d, (err) => ({ error: err.message, status: null }))
      .then((d) => {
        detailLoading.delete(id);
        if (session !== S.session) return;
        exportDetails.set(id, d);
        rerenderExports();
      });
  }

  function exportMetrics(d) {
    const m = d.metrics || {};
    const attempts = (m.attempts || []).map((a) => ({ ...a, name: a.quant ? `${a.format} ${a.quant}` : a.format }));
    // A GGUF is checked after its merged model: that check comes first. A merged export's only
    // attempt is that check.
    if (m.merged && !attempts.some((a) => a.format === "merged")) {
      attempts.unshift({ ...m.merged, name: "merged (before conversion)" });
    }
    if (!attempts.length) return h("p", { class: "muted small", text: "No consistency numbers were recorded." });
    const tol = Object.entries(m.tolerance || {}).filter(([, v]) => v !== null && v !== undefined)
      .map(([k, v]) => `${label(k)} ${v}`).join(" · ");
    const cell = (v, digits) => h("td", { class: "num", text: fixed(v, digits) });
    return h("div", { class: "export-metrics" },
      h("p", { class: "small muted" },
        `Compared with the served version on ${m.prompts ?? "?"} prompts.`, tol ? ` Tolerance: ${tol}.` : ""),
      h("table", { class: "compact", "data-testid": "export-metrics" },
        h("thead", {}, h("tr", {},
          ["Check", "Result", "Decisive agreement", "Token agreement", "Exact match", "NLL delta",
           "PPL ratio", "Reasons"].map((c) => h("th", { scope: "col", text: c })))),
        h("tbody", {}, attempts.map((a) => {
          const x = a.metrics || {};
          return h("tr", {},
            h("th", { scope: "row", text: a.name }),
            h("td", {}, h("span", { class: a.status === "passed" ? "ok" : "bad", text: a.status })),
            cell(x.decisive_agreement, 3), cell(x.token_agreement, 3), cell(x.exact_match, 2),
            h("td", { class: "num", text: signed(x.nll_delta, 4) }),
            cell(x.ppl_ratio, 3),
            h("td", { class: "small" }, (a.reasons || []).length
              ? h("ul", { class: "reasons" }, a.reasons.map((r) => h("li", { text: r }))) : "—"));
        }))),
      d.lineage && Object.keys(d.lineage).length
        ? h("details", { "data-keep": `lineage-${d.id}` }, h("summary", { text: "Lineage" }),
            h("pre", { text: JSON.stringify(d.lineage, null, 2) })) : null);
  }

  function prefillExport(e, quant) {
    $("export-format").value = "gguf";
    $("export-quant").value = quant;
    $("export-version").value = String(e.version);
    syncExportForm();
    $("export-note").textContent = `The form asks for GGUF ${quant} of v${e.version}: press Request export.`;
    $("export-submit").focus();
  }

  function syncExportForm() {
    const gguf = $("export-format").value === "gguf";
    $("export-quant").disabled = !gguf;
    $("export-fallback").disabled = !gguf;
  }

  function showExportError(text) {
    const box = $("export-error");
    box.textContent = text;
    box.hidden = !text;
  }

  function resetExportForm() {
    S.fallbackTouched = false;
    showExportError("");
    $("export-note").textContent = "";
    $("export-version").value = "";
    $("export-reason").value = "";
    S.exportOpen = null;
    S.exportJust = null;
  }

  async function onExportSubmit(ev) {
    ev.preventDefault();
    if (!S.alias || S.exporting) return;
    const alias = S.alias;
    const session = S.session;
    const format = $("export-format").value;
    const body = { format };
    if (format === "gguf") {
      body.quant = $("export-quant").value;
      body.fallback = $("export-fallback").checked;
    }
    const version = $("export-version").value.trim();
    if (version) {
      if (!/^[0-9]+$/.test(version) || Number(version) < 1) {
        showExportError("The version is a number such as 3, or empty for the version the alias serves.");
        $("export-version").focus();
        return;
      }
      body.version = Number(version);
    }
    const reason = $("export-reason").value.trim();
    if (reason) body.reason = reason;
    S.exporting = true;
    $("export-submit").disabled = true;
    $("export-submit").textContent = "Requesting…";
    showExportError("");
    $("export-note").textContent = "";
    try {
      const e = await api(exportPath(alias), { method: "POST", body });
      if (session !== S.session) return;
      S.exportJust = e.id;
      const what = `${exportFormat(e)} of v${e.version} (${e.lora_name})`;
      $("export-note").textContent =
        e.status === "queued" ? `Export queued: ${what}. A worker picks it up; this page follows it.`
        : e.status === "running" ? `An identical export is already running: ${what}.`
        : e.status === "passed" ? `An identical export has already passed: ${what}. Download it below.`
        : `Export ${what}: ${e.status}.`;
      $("export-reason").value = "";
    } catch (err) {
      if (session !== S.session) return;
      if (err.status === 401) return signOut(authMessage(err));
      const prefix = err.status === 403 ? `${NEEDS_OPS} ` : "";
      showExportError(`${prefix}The API refused the export: ${err.message}` +
                      `${err.status ? ` (HTTP ${err.status})` : ""}`);
    } finally {
      S.exporting = false;
      $("export-submit").disabled = false;
      $("export-submit").textContent = "Request export";
    }
    refresh();
  }

  async function sha256Hex(blob) {
    if (!window.crypto || !crypto.subtle || blob.size > verifyMax()) return null;
    const digest = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
    return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
  }

  // A plain link cannot carry the Bearer header: fetch with the key, check the bytes against
  // the recorded sha256, and hand them to the browser as a Blob.
  async function downloadFile(alias, e, f) {
    const key = `${e.id}/${f.name}`;
    if (downloading.has(key)) return;
    const session = S.session;
    downloading.add(key);
    rerenderExports();
    showExportError("");
    $("export-note").textContent = `Downloading ${f.name}…`;
    if (f.bytes > verifyMax()) return streamFile(alias, e, f, key, session);
    try {
      const path = `${exportPath(alias, e.id)}/files/${f.name.split("/").map(encodeURIComponent).join("/")}`;
      let r;
      try {
        r = await fetch(path, { headers: { Authorization: `Bearer ${S.key}` }, cache: "no-store",
                                credentials: "omit" });
      } catch (err) {
        throw new ApiFailure(0, "the API is unreachable");
      }
      if (!r.ok) {
        let msg = `HTTP ${r.status}`;
        try {
          const data = await r.json();
          msg = (data && data.error && data.error.message) || msg;
        } catch (err) { /* not JSON */ }
        throw new ApiFailure(r.status, msg);
      }
      const blob = await r.blob();
      if (session !== S.session) return;
      const expected = (r.headers.get("X-Checksum-Sha256") || f.sha256 || "").toLowerCase();
      const got = await sha256Hex(blob);
      if (got && ((expected && got !== expected) || (f.sha256 && got !== f.sha256))) {
        throw new Error(`its sha256 is ${short(got)}…, the export recorded ${short(f.sha256 || expected)}…: ` +
                        "nothing was saved");
      }
      const url = URL.createObjectURL(blob);
      saveAs(url, f.name);
      setTimeout(() => URL.revokeObjectURL(url), 60000);
      $("export-note").textContent = `Downloaded ${f.name} (${bytes(blob.size)}); ` +
        (got ? "sha256 checked in the browser." : `check its sha256 yourself: ${f.sha256}.`);
    } catch (err) {
      downloadFailed(f, err, session);
    } finally {
      downloadDone(key, session);
    }
  }

  function saveAs(href, name) {
    const a = h("a", { href, download: name.split("/").pop(), hidden: true });
    document.body.append(a);
    a.click();
    a.remove();
  }

  function downloadFailed(f, err, session) {
    if (session !== S.session) return;
    if (err.status === 401) return signOut(authMessage(err));
    $("export-note").textContent = "";
    showExportError(`Could not download ${f.name}: ${err.message}` +
                    `${err.status ? ` (HTTP ${err.status})` : ""}`);
  }

  function downloadDone(key, session) {
    downloading.delete(key);
    if (session === S.session) rerenderExports();
  }

  // Too big to hold in the page: a short-lived link lets the browser stream it to disk itself.
  async function streamFile(alias, e, f, key, session) {
    try {
      const link = await api(`${exportPath(alias, e.id)}/links`, { method: "POST", body: { name: f.name } });
      if (session !== S.session) return;
      saveAs(link.url, f.name);
      $("export-note").textContent = `Downloading ${f.name} (${bytes(f.bytes)}) through a link valid ` +
        `${duration(link.expires_in_s)}; check its sha256 when it lands: ${f.sha256}.`;
    } catch (err) {
      downloadFailed(f, err, session);
    } finally {
      downloadDone(key, session);
    }
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
      h("td", {}, r.method || "—", quantTag(r)),
      h("td", { class: "progress-cell" }, progressView(r)),
      h("td", { "data-testid": "run-gate" }, gateSummary(r)),
      h("td", {}, r.candidate_version ? h("code", { text: r.candidate_version }) : "—"),
      h("td", { class: "actions-cell" }, h("div", { class: "actions" }, h("button", {
        type: "button", "data-testid": "open-run", onclick: () => selectRun(r.id) },
        r.state === "awaiting_approval" ? "Review" : "Report", srOnly(` run ${short(r.id)} of ${r.alias}`))))));
    fill($("runs-body"), rows.length ? rows : emptyRow(8, "No runs yet: they start when an alias collects enough ratings."));
  }

  // A qlora policy where QLoRA cannot run: plain LoRA trained (the policy allowed the fallback)
  // or the run failed. Shown, never silent (workers/quantization.py).
  function quantTag(r) {
    const q = (r.metrics || {}).quantization;
    if (!q || q.requested === "none") return null;
    if (q.fallback) return h("span", { class: "tag warn-tag", "data-testid": "run-quant-fallback",
                                       title: q.reason || "", text: "QLoRA → LoRA fallback" });
    return h("span", { class: "tag", "data-testid": "run-quant", title: q.reason || "",
                       text: q.used === "qlora" ? "QLoRA" : "QLoRA unavailable" });
  }

  function quantFact(run) {
    const q = (run.metrics || {}).quantization;
    if (!q || q.requested === "none") return null;
    const what = q.fallback ? "plain LoRA (fallback from QLoRA)" : q.used === "qlora" ? "QLoRA" : "QLoRA unavailable";
    return h("span", { class: q.fallback || !q.used ? "bad" : null, "data-testid": "run-quantization",
                       text: q.reason ? `${what}: ${q.reason}` : what });
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
    const quant = quantFact(run);
    if (quant) facts.splice(3, 0, ["Quantization", quant]);
    const job = run.training_job;
    if (job) {
      // The training job the run follows (workers/trainer/); restarts say a training process died.
      const restarts = job.restarts ? `, ${job.restarts} restart${job.restarts > 1 ? "s" : ""}` : "";
      facts.push(["Training job", h("span", {
        class: job.restarts ? "bad" : null, "data-testid": "run-training-job",
        title: job.previous_end ? `the attempt before ended: ${job.previous_end}` : "",
        text: `${job.backend}, attempt ${job.attempt}${restarts}, on ${job.host}`,
      })]);
    }
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

  // --- replicas ----------------------------------------------------------------------------

  function renderReplicas(data) {
    if (data.failed) {
      fill($("replicas-count"), "");
      fill($("discovery"));
      fill($("replicas-body"), failedRow(4, `Could not read the replicas: ${data.failed}`));
      return;
    }
    const up = data.replicas.filter((r) => r.healthy).length;
    fill($("replicas-count"), `${data.replicas.length} replica${data.replicas.length === 1 ? "" : "s"}, ${up} healthy`);
    fill($("discovery"), data.discovery.map(lookupLine));
    fill($("replicas-body"), data.replicas.length ? data.replicas.map(replicaRow)
                                                  : emptyRow(4, "No vLLM replicas configured."));
  }

  // One FLYWHEEL_VLLM_URLS entry: what it resolved to, when, and why its last lookup failed.
  function lookupLine(d) {
    const n = d.replicas.length;
    const what = d.expanded ? `resolves to ${n} replica${n === 1 ? "" : "s"}` : "one replica, as configured";
    return h("li", { "data-testid": "discovery-entry", "data-name": d.name },
      h("code", { text: d.name }), ` ${what}`,
      d.resolved_at ? [", looked up ", when(d.resolved_at)] : null,
      d.error ? h("span", { class: "bad", "data-testid": "discovery-error",
                            text: ` · lookup failed: ${d.error} (last known replicas kept)` }) : null);
  }

  function replicaRow(r) {
    return h("tr", { "data-testid": "replica-row", "data-url": r.url },
      h("th", { scope: "row" }, h("code", { text: r.url }),
        r.source !== r.url ? h("div", { class: "muted small", text: `from ${r.source}` }) : null),
      h("td", {}, h("span", { class: r.healthy ? "ok" : "bad", text: r.healthy ? "healthy" : "down" })),
      h("td", {}, !r.observed ? h("span", { class: "muted", text: "not observed yet" })
        : r.versions.length ? h("ul", { class: "chips" }, r.versions.map((v) =>
            h("li", { class: `chip vs-${v.role}`, title: v.version,
                      "data-testid": "resident-version", "data-version": v.version,
                      "data-role": v.role },
              `${v.alias} v${v.number} `, h("span", { class: "small", text: v.role }))))
        : h("span", { class: "muted", text: "none of yours" })),
      h("td", { text: r.adapters === null ? "—" : String(r.adapters) }));
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
                                   "stroke-linejoin": "round", "stroke-dasharray": sr.dash ? "6 4" : null,
                                   points: ps.map((p) => `${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join(" ") }));
      }
      for (const p of ps) {
        // A dashed series has hollow points, so it reads apart where lines cross.
        svg.append(s("circle", { cx: sx(p.x).toFixed(1), cy: sy(p.y).toFixed(1), r: 3.5,
                                 fill: sr.dash ? "#fff" : sr.color, stroke: sr.dash ? sr.color : null,
                                 "stroke-width": sr.dash ? 2 : null }, s("title", { text: p.tip })));
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
    return h("ul", { class: "legend" }, items.map((it) => h("li", {}, swatch(it.color, it.dash), it.name)));
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
    $("export-form").addEventListener("submit", onExportSubmit);
    $("export-format").addEventListener("change", syncExportForm);
    $("export-fallback").addEventListener("change", () => { S.fallbackTouched = true; });
    // An answer to the previous request goes stale as soon as the form changes.
    $("export-form").addEventListener("input", () => showExportError(""));
    syncExportForm();
    const saved = sessionStorage.getItem(KEY_STORE);
    if (saved) login(saved);
    else $("key-input").focus();
  }

  document.addEventListener("DOMContentLoaded", init);
})();
