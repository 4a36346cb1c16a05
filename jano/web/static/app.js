/* Jano dashboard: polls `status` and `usage`, keeps a few minutes of history
   in this tab (bounded), and draws it; draws the last hour or day from the
   samples Jano keeps itself (`usage/series`, `usage/summary`); loads and
   unloads models on request.  No dependencies, no build step. */
"use strict";
(function () {
  const POLL_MS = 1500;
  const HIDDEN_POLL_MS = 6000;            // slower while the tab is in the background
  const HISTORY_MS = 15 * 60e3;           // how long samples and swaps are kept
  const MAX_SAMPLES = 700;                // hard cap on top of the time bound
  const MAX_SWAPS = 300;
  const MIN_SPAN_MS = 30e3, MAX_SPAN_MS = 10 * 60e3;   // what the charts show
  const PALETTE = 8;
  const TOKEN_KEY = "jano.telemetryToken";
  const ADMIN_KEY = "jano.adminKey";      // for load and unload, when it differs from the telemetry token
  const NOTE_MS = 8000;                   // how long the outcome of a load or unload stays shown
  const SVG_NS = "http://www.w3.org/2000/svg";
  const HISTORY_REFRESH_MS = 30e3;        // the stored history: fetched on load, then this often
  const SAMPLE_GAP_MS = 25e3;             // samples further apart (Jano was down): a gap in the lines
  const DAY_MS = 86400e3;
  const SPANS = { hour: { ms: 3600e3, bucket: 300e3, per: "per 5 min", label: "last hour" },
    day: { ms: DAY_MS, bucket: 3600e3, per: "per hour", label: "last day" } };
  const OUTCOMES = { completed: "completed", client_disconnected: "client left",
    upstream_error: "backend error", upstream_stalled: "stalled", rejected: "refused by Jano" };

  // Jano's own routes sit next to the page: "/" for /ui and /, "/jano/" for /jano/ui.
  const BASE = location.pathname.replace(/(^|\/)ui\/?(index\.html)?$/, "$1").replace(/[^/]*$/, "");

  const state = { samples: [], swaps: new Map(), colors: new Map(), skew: 0, status: null,
    usage: null, timer: 0, busy: false, waitingForToken: false, mem: {},
    acting: new Set(), retry: null, noteTimer: 0,
    hist: { span: "hour", series: [], seriesSpan: null, models: null, callers: null, errors: [], due: 0, busy: false, at: 0 },
    server: { model: null, log: null, logError: null, busy: false } };

  const $ = (id) => document.getElementById(id);
  const isNum = (v) => typeof v === "number" && isFinite(v);
  const nowMs = () => Date.now() + state.skew;     // the server's clock, as best known

  /* -- small DOM helpers ------------------------------------------------ */

  function h(tag, attrs, ...kids) {
    const el = tag.startsWith("svg:") ? document.createElementNS(SVG_NS, tag.slice(4))
      : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v != null && v !== false) el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const kid of kids.flat()) {
      if (kid != null && kid !== false && kid !== "") el.append(kid instanceof Node ? kid : String(kid));
    }
    return el;
  }
  // A null value: a muted dash that says what it means, never a 0.
  const na = (what = "not reported") => h("span", { class: "na", title: what },
    h("span", { "aria-hidden": "true" }, "—"), h("span", { class: "sr-only" }, what));
  const naText = (what = "not reported") => h("span", { class: "na" }, what);
  const or = (v, fmt, what) => (v == null ? na(what) : fmt(v));
  const color = (model) => {
    if (model == null) return "var(--muted)";
    if (!state.colors.has(model)) state.colors.set(model, state.colors.size % PALETTE);
    return `var(--m${state.colors.get(model)})`;
  };
  // Rebuild only what changed, so text in the tables can be selected between polls.
  function update(el, data, build) {
    const key = JSON.stringify(data);
    if (el.dataset.key === key) return;
    el.dataset.key = key;
    el.replaceChildren(...build());
  }
  const modelName = (m) => [h("span", { class: "swatch", style: `background:${color(m)}`, "aria-hidden": "true" }), m];

  /* -- formatting ------------------------------------------------------- */

  const num = (v, d = 0) => v.toLocaleString(undefined, { maximumFractionDigits: d, minimumFractionDigits: d });
  const tokS = (v) => num(v, v < 100 ? 1 : 0);
  function dur(s) {
    s = Math.max(0, Math.floor(s));
    const d = Math.floor(s / 86400), hh = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60), ss = s % 60;
    if (d) return `${d} d ${hh} h`;
    if (hh) return `${hh} h ${String(m).padStart(2, "0")} min`;
    return m ? `${m} min${ss ? ` ${ss} s` : ""}` : `${ss} s`;
  }
  function ms(v) {
    if (!isNum(v)) return null;
    if (v < 1000) return `${Math.round(v)} ms`;
    return v < 60e3 ? `${(v / 1000).toFixed(2)} s` : dur(v / 1000);
  }
  const clock = (t) => new Date(t).toLocaleTimeString([], { hour12: false });
  const ago = (iso) => (nowMs() - Date.parse(iso)) / 1000;
  // "a → b", for an unload (a swap to nothing) "a → nothing (unloaded, idle)", and for a
  // hidden reload (the backend loaded the model again on its own) "a reloaded by the backend".
  const isReload = (s) => s.kind === "reload";
  const isUnload = (s) => s.kind === "unload" || (s.to == null && !isReload(s));
  const kindOf = (s) => (isReload(s) ? "reload" : isUnload(s) ? "unload" : "swap");
  const swapText = (s) => (isReload(s) ? `${s.to ?? s.from} reloaded by the ${s.reason || "backend"}`
    : `${(s.evicted && s.evicted.length > 1 ? s.evicted.join(" + ") : s.from) ?? "nothing"} → ` + (isUnload(s) ? `nothing (unloaded${s.reason ? ", " + s.reason : ""})` : s.to));

  /* -- talking to Jano -------------------------------------------------- */

  function readToken(key = TOKEN_KEY) {
    try { return sessionStorage.getItem(key); } catch (e) { return state.mem[key] ?? null; }
  }
  function writeToken(v, key = TOKEN_KEY) {
    state.mem[key] = v;
    try { v == null ? sessionStorage.removeItem(key) : sessionStorage.setItem(key, v); } catch (e) { /* memory only */ }
  }
  // Load and unload take the admin key; until one is asked for, the telemetry token may be it.
  const adminToken = () => readToken(ADMIN_KEY) ?? readToken();
  const bearer = (token) => (token ? { Authorization: "Bearer " + token } : {});

  async function getJSON(path, token = readToken()) {
    const headers = { Accept: "application/json", ...bearer(token) };
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), 5000);
    try {
      const r = await fetch(BASE + path, { headers, cache: "no-store", signal: ctl.signal });
      if (r.status === 401) throw Object.assign(new Error("unauthorized"), { auth: true });
      if (!r.ok) throw new Error(`${path.split("?")[0]} answered HTTP ${r.status}`);
      return await r.json();
    } finally {
      clearTimeout(timer);
    }
  }

  function setConn(kind, text) {
    document.body.dataset.conn = kind;
    $("conn").textContent = text;
  }

  async function poll() {
    if (state.busy || state.waitingForToken) return;
    state.busy = true;
    clearTimeout(state.timer);
    try {
      const [st, us] = await Promise.all([getJSON("status"), getJSON("usage?limit=20")]);
      show(st, us);
      setConn("live", `live · ${clock(Date.now())}`);
      if (Date.now() >= state.hist.due) loadHistory();
    } catch (e) {
      if (e.auth) { state.busy = false; askToken(); return; }
      setConn("error", e.name === "AbortError" ? "Jano does not answer; retrying…"
        : `cannot reach Jano (${e.message}); retrying…`);
    }
    state.busy = false;
    state.timer = setTimeout(poll, document.hidden ? HIDDEN_POLL_MS : POLL_MS);
  }

  // One form asks for either key: the telemetry token at the top of the page, the admin
  // key below the model table, where its Load or Unload button was clicked.
  function openForm(kind, rejected, title, message, submit, where) {
    const form = $("auth-form");
    form.dataset.for = kind;
    form.dataset.state = rejected ? "rejected" : "needed";
    $("auth-title").textContent = title;
    $("auth-message").textContent = message;
    $("token-submit").textContent = submit;
    form.querySelector("label").textContent = kind === "admin" ? "Key" : "Token";
    $("token-cancel").hidden = kind !== "admin";
    where(form);
    form.hidden = false;
    $("token-input").value = "";
    $("token-input").focus();
  }

  function askToken() {
    const rejected = readToken() != null;
    writeToken(null);
    state.waitingForToken = true;
    state.retry = null;
    openForm("telemetry", rejected, "Telemetry token needed", rejected
      ? "That token was not accepted. Enter the telemetry token again."
      : "This Jano protects its status with a telemetry token ([server] telemetry_key). " +
        "It is kept only in this browser tab.", "Connect", (f) => document.querySelector("main").prepend(f));
    setConn("auth", "token needed");
  }

  function askAdmin(retry, rejected) {
    state.retry = retry;
    openForm("admin", rejected, "Admin key needed", rejected
      ? "That key was not accepted. Enter the admin key again."
      : "Loading and unloading models takes the admin key ([server] admin_key, or api_key " +
        "when there is none). It is kept only in this browser tab.", "Send",
    (f) => $("models-panel").after(f));
  }

  $("auth-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const value = $("token-input").value.trim();
    if (!value) return;
    $("auth-form").hidden = true;
    if ($("auth-form").dataset.for === "admin") {
      writeToken(value, ADMIN_KEY);
      const retry = state.retry;
      state.retry = null;
      if (retry) retry();
      return;
    }
    writeToken(value);
    state.waitingForToken = false;
    setConn("connecting", "connecting…");
    poll();
  });
  $("token-cancel").addEventListener("click", () => {
    $("auth-form").hidden = true;
    state.retry = null;
  });

  /* -- load and unload -------------------------------------------------- */

  function note(model, kind, text) {
    clearTimeout(state.noteTimer);
    const el = $("model-action");
    el.dataset.kind = kind;
    el.dataset.model = model;
    el.replaceChildren(...(text ? [h("strong", {}, model), ": ", text] : []));
    state.noteTimer = setTimeout(() => { el.replaceChildren(); el.dataset.kind = ""; }, NOTE_MS);
  }

  async function act(verb, model) {
    if (state.acting.has(model) || state.waitingForToken) return;
    const token = adminToken();
    state.acting.add(model);
    render();
    note(model, "busy", `${verb === "load" ? "loading" : "unloading"}…`);
    try {
      const path = `models/${model.split("/").map(encodeURIComponent).join("/")}/${verb}`;
      const r = await fetch(BASE + path, { method: "POST", cache: "no-store",
        headers: { Accept: "application/json", ...bearer(token) } });
      const body = await r.json().catch(() => null);
      if (r.ok) {
        note(model, "ok", body && body.status === "loaded" ? "already loaded"
          : body && body.status === "unloaded" ? "not loaded" : `${body ? body.status : verb}…`);
      } else {
        note(model, "error", (body && body.error && body.error.message) || `HTTP ${r.status}`);
      }
      if (r.status === 401) {
        const rejected = readToken(ADMIN_KEY) != null;
        writeToken(null, ADMIN_KEY);
        askAdmin(() => act(verb, model), rejected);
      }
    } catch (e) {
      note(model, "error", `cannot reach Jano (${e.message})`);
    } finally {
      state.acting.delete(model);
      render();
    }
    poll();   // show what it started without waiting for the next round
  }

  $("models").addEventListener("click", (ev) => {
    const b = ev.target.closest("button[data-action]");
    if (b && !b.disabled) act(b.dataset.action, b.dataset.model);
  });

  /* -- history ---------------------------------------------------------- */

  function show(st, us) {
    const serverNow = Date.parse(st.startedAt) + st.uptimeSeconds * 1000;
    if (isFinite(serverNow)) state.skew = serverNow - Date.now();
    state.status = st;
    state.usage = us;
    const now = nowMs();
    Object.keys({ ...st.backendHealth, ...st.queueDepthByModel }).sort().forEach(color);
    state.samples.push({ t: now, total: st.recentGenTokS, by: { ...(st.recentGenTokSByModel || {}) } });
    while (state.samples.length > MAX_SAMPLES || state.samples[0].t < now - HISTORY_MS) state.samples.shift();
    for (const s of st.recentSwaps || []) {
      const end = Date.parse(s.at), start = Date.parse(s.startedAt);
      if (!isFinite(end)) continue;
      state.swaps.set(`${s.group}|${s.startedAt}|${s.at}`,
        { ...s, end, start: isFinite(start) ? start : end - (s.durationMs || 0) });
    }
    const old = [...state.swaps.entries()].sort((a, b) => a[1].end - b[1].end);
    old.forEach(([k, s], i) => { if (s.end < now - HISTORY_MS || i < old.length - MAX_SWAPS) state.swaps.delete(k); });
    render();
    loadServerLog();
  }

  /* -- drawing ---------------------------------------------------------- */

  function render() {
    const st = state.status;
    if (!st) return;
    const now = nowMs();
    let first = now;
    if (state.samples.length) first = Math.min(first, state.samples[0].t);
    for (const s of state.swaps.values()) first = Math.min(first, s.start);
    const clamp = (d) => Math.min(MAX_SPAN_MS, Math.max(MIN_SPAN_MS, d));
    const span = clamp(now - first);   // the timeline reaches back to the oldest swap known
    renderNow(st, now);
    renderModels(st);
    renderTimeline(st, now - span, now);
    renderSwapList(st);
    renderTokChart(now - clamp(now - (state.samples.length ? state.samples[0].t : now)), now);
    renderRequests(state.usage);
    renderTotals(st);
    renderServer(st);
    $("timeline-span").textContent = `(last ${dur(span / 1000)})`;
  }

  function renderNow(st, now) {
    $("version").textContent = `v${st.version} · up ${dur(st.uptimeSeconds)}`;
    $("draining").hidden = !st.draining;
    $("current-model").replaceChildren(...(st.currentModel != null ? modelName(st.currentModel) : [naText("nothing loaded")]));
    $("current-since").textContent = st.currentModelLoadedAt
      ? `since ${clock(Date.parse(st.currentModelLoadedAt))} (${dur(ago(st.currentModelLoadedAt))})` : "";

    const groups = Object.entries(st.groups || {});
    const budgeted = groups.some(([, g]) => g.memoryBudgetMiB != null);
    const many = groups.length > 1 || budgeted;
    const gib = (mib) => `${(mib / 1024).toFixed(mib % 1024 ? 1 : 0)} GiB`;
    const residents = (g) => (g.residents && g.residents.length ? g.residents
      : g.resident != null ? [g.resident] : []);
    $("groups").hidden = !many;
    $("groups").replaceChildren(...(!many ? [] : groups.map(([name, g]) => h("li", { "data-group": name },
      h("span", { class: "muted" }, `${name}: `),
      ...(residents(g).length ? residents(g).flatMap((m, i) => (i ? [", ", ...modelName(m)] : modelName(m)))
        : [naText("nothing loaded")]),
      g.memoryBudgetMiB != null ? h("span", { class: "muted", "data-testid": "group-memory",
        title: "the memory the configuration states for each model, not a measurement" },
        ` · ${gib(g.memoryUsedMiB || 0)} of ${gib(g.memoryBudgetMiB)} configured`) : "",
      g.loadedAt ? h("span", { class: "muted" }, ` since ${clock(Date.parse(g.loadedAt))}`) : "",
      g.swapInProgress ? h("span", { class: "tag busy" }, `loading ${g.swapInProgress.to}`) : ""))));

    const busy = groups.filter(([, g]) => g.swapInProgress);
    const unloading = Object.keys(st.modelStatus || {}).filter((m) => st.modelStatus[m] === "unloading");
    const sw = $("swap-status");
    sw.dataset.state = busy.length || unloading.length ? "swapping" : "idle";
    sw.replaceChildren(...busy.map(([name, g]) => h("span", { class: "swapping" },
      "→ ", modelName(g.swapInProgress.to),
      h("small", {}, `${many ? ` (${name})` : ""} ${ms(Math.max(0, now - Date.parse(g.swapInProgress.since)))} so far`))),
    ...unloading.map((m) => h("span", { class: "swapping" }, "unloading ", modelName(m))),
    ...(busy.length || unloading.length ? [] : [naText("none")]));
    // The status's lastSwap counts swaps only; an unload since then is newer news (a hidden
    // reload is not Jano's doing: it has its own figure).
    const newest = [...state.swaps.values()].filter((s) => !isReload(s))
      .reduce((a, s) => (!a || s.end > a.end ? s : a), null);
    const last = newest && !(Date.parse(st.lastSwap && st.lastSwap.at) > newest.end) ? newest : st.lastSwap;
    $("last-swap").replaceChildren(...(last ? [`last: ${swapText(last)}, `,
      ms(last.durationMs) ?? "duration not reported", " ",
      h("span", { class: `result r-${last.result}` }, last.result)] : ["no swaps yet"]));

    const thr = st.thrashSwapsPerHour, n = st.swapsLastHour;
    const over = isNum(n) && isNum(thr) && n > thr;
    $("swaps-hour").replaceChildren(or(n, String));
    $("swaps-hour").classList.toggle("bad", over);
    $("thrash-limit").textContent = isNum(thr) ? `warning above ${thr} per hour` : "";
    const reloads = st.hiddenReloadsLastHour, lost = st.hiddenReloadSecondsLastHour;
    $("hidden-reloads").replaceChildren("hidden reloads, last hour: ", or(reloads, String),
      isNum(reloads) && reloads > 0 ? ` (${isNum(lost) ? ms(lost * 1000) : "time not reported"})` : "");
    $("hidden-reloads").classList.toggle("warn", isNum(reloads) && reloads > 0);
    const warn = $("thrash-warning");
    warn.hidden = !over;
    warn.textContent = over ? `Thrashing: ${n} model swaps in the last hour, more than the ${thr} per hour ` +
      "threshold. Each swap stalls every request behind it; look for clients that alternate between models." : "";
    $("stuck-warning").hidden = st.schedulerStuck !== true;

    $("tok-s").replaceChildren(...(isNum(st.recentGenTokS) ? [tokS(st.recentGenTokS), h("small", {}, " tok/s")] : [naText()]));
    $("tok-s-window").textContent = `all models, last ${dur(st.recentWindowSeconds ?? 60)}`;
    $("in-flight").replaceChildren(or(st.inFlight, String));
    $("queued").replaceChildren(...(isNum(st.queueDepth) ? [`${st.queueDepth} queued`] : ["queued: ", na()]));
    $("oldest-waiting").replaceChildren(isNum(st.oldestWaitingMs) ? ms(st.oldestWaitingMs) : naText("nobody"));
  }

  // "loaded", "loading", "unloading" or "unloaded" as the status's modelStatus says, or
  // "always_on" for the models in its alwaysOn (they hold no slot: nothing to load or unload).
  function modelStates(st) {
    const always = new Set(st.alwaysOn || []), status = st.modelStatus || {};
    return (m) => (always.has(m) ? "always_on" : status[m] || "unknown");
  }

  function modelAction(m, what, draining) {
    if (what === "always_on") return h("span", { class: "muted" }, "always on");
    const verb = what === "loaded" ? "unload" : what === "unloaded" ? "load" : null;
    if (!verb) return "";
    const busy = state.acting.has(m) || draining;
    return h("button", { type: "button", class: "act", "data-action": verb, "data-model": m, disabled: busy,
      title: draining ? "Jano is shutting down" : null, "aria-label": `${verb === "load" ? "Load" : "Unload"} ${m}` },
    verb === "load" ? "Load" : "Unload");
  }

  function renderModels(st) {
    const names = Object.keys({ ...st.modelStatus, ...st.backendHealth, ...st.queueDepthByModel, ...st.inFlightByModel }).sort();
    const stateOf = modelStates(st), what = Object.fromEntries(names.map((m) => [m, stateOf(m)]));
    const pick = (o, k) => (o || {})[k];
    const seen = [st.backendHealth, st.queueDepthByModel, st.inFlightByModel, st.recentGenTokSByModel, st.modelsDown,
      what, [...state.acting], st.draining];
    update($("models").tBodies[0], seen, () => names.map((m) => {
      const health = pick(st.backendHealth, m), down = pick(st.modelsDown, m), w = what[m];
      // stalled: its generation is wedged, so Jano answers its requests 503 until `until`
      const stalled = health === "stalled", why = down && down.reason;
      return h("tr", { "data-model": m, "data-state": w, "data-health": health },
        h("th", { scope: "row" }, modelName(m), w === "loaded" ? h("span", { class: "tag" }, "loaded")
          : w === "loading" || w === "unloading" ? h("span", { class: "tag busy" }, w) : ""),
        h("td", {}, health ? h("span", { class: `health h-${health}`, title: stalled
          ? why || "stalled: its last requests stalled" : null }, health) : na()),
        h("td", { class: "n" }, or(pick(st.queueDepthByModel, m), String)),
        h("td", { class: "n" }, or(pick(st.inFlightByModel, m), String)),
        h("td", { class: "n", "data-testid": "model-tok-s" }, or(pick(st.recentGenTokSByModel, m), tokS)),
        h("td", { class: stalled ? "err" : null }, down ? `${stalled ? "refused (503)" : "held down"} until ` +
          `${clock(Date.parse(down.until))}${why ? ": " + why : ""}` : ""),
        h("td", {}, modelAction(m, w, st.draining)));
    }));
  }

  // Tick marks along the bottom, labelled relative to now.
  function axis(svg, x, t0, t1, y, left, right) {
    const steps = [5e3, 10e3, 15e3, 30e3, 60e3, 120e3, 300e3, 600e3, 900e3, 1800e3, 3600e3, 3 * 3600e3, 6 * 3600e3];
    const step = steps.find((s) => (t1 - t0) / s <= Math.max(2, (right - left) / 90)) || 6 * 3600e3;
    svg.append(h("svg:line", { x1: left, x2: right, y1: y, y2: y, class: "axis" }));
    for (let k = 0; t1 - k * step >= t0 - 1; k++) {
      const xx = x(t1 - k * step), s = (k * step) / 1000;
      const anchor = k === 0 ? "end" : xx - left < 24 ? "start" : "middle";
      svg.append(h("svg:line", { x1: xx, x2: xx, y1: y, y2: y + 4, class: "axis" }),
        h("svg:text", { x: xx, y: y + 15, class: "tick", "text-anchor": anchor },
          k === 0 ? "now" : s < 60 ? `−${s} s` : s % 3600 ? `−${s / 60} min` : `−${s / 3600} h`));
    }
  }

  function frame(svg, height) {
    const width = Math.max(280, Math.floor(svg.parentNode.clientWidth || 600));
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    svg.replaceChildren();
    return width;
  }

  function renderTimeline(st, t0, t1) {
    const svg = $("swap-timeline");
    const all = [...state.swaps.values()].sort((a, b) => a.start - b.start);
    // a lane per group, and one for the group of a reload of an always_on model (in no slot)
    const groups = [...new Set([...Object.keys(st.groups || {}), ...all.map((s) => s.group)])];
    if (!groups.length) groups.push("default");
    const lane = 30, gap = 8, top = 10;
    const W = frame(svg, top + groups.length * (lane + gap) + 14);
    const left = groups.length > 1 ? 84 : 0, right = W - 1;
    const x = (t) => left + ((Math.min(Math.max(t, t0), t1) - t0) / (t1 - t0)) * (right - left);
    let shown = 0, failed = 0, reloads = 0;
    groups.forEach((g, gi) => {
      const y = top + gi * (lane + gap), info = (st.groups || {})[g] || {};
      svg.append(h("svg:rect", { x: left, y, width: right - left, height: lane, rx: 3, class: "lane" }));
      if (left) svg.append(h("svg:text", { x: left - 6, y: y + lane / 2 + 4, "text-anchor": "end", class: "tick" }, g));
      const segment = (model, a, b) => {
        if (model == null || b <= t0 || a >= t1 || b <= a) return;
        const xa = x(a), w = x(b) - xa;
        if (w < 0.5) return;
        svg.append(h("svg:rect", { x: xa, y: y + 4, width: w, height: lane - 8, rx: 2, class: "resident",
          style: `fill:${color(model)}`, "data-model": model },
          h("svg:title", {}, `${model} loaded, ${a < t0 ? "before " + clock(t0) : clock(a)} to ${b >= t1 ? "now" : clock(b)}`)));
        if (w > model.length * 7 + 12) svg.append(h("svg:text", { x: xa + 6, y: y + lane / 2 + 4, class: "seglabel" }, model));
      };
      const mine = all.filter((s) => s.group === g);
      const moves = mine.filter((s) => !isReload(s));   // a reload leaves the model where it was
      let cur = moves.length ? moves[0].from : info.resident, since = -Infinity;
      for (const s of moves) {
        segment(cur, since, s.start);
        cur = s.result === "ok" ? s.to : null;
        since = s.end;
      }
      const pending = info.swapInProgress;
      const pendingStart = pending ? Date.parse(pending.since) : t1;
      segment("resident" in info ? info.resident : cur, since, pendingStart);
      const mark = (s, a, b, result, label) => {
        const xa = x(a), w = Math.max(3, x(b) - xa);
        const kind = s ? kindOf(s) : "swap";
        svg.append(h("svg:g", { class: `swap r-${result} k-${kind}`, "data-result": result, "data-testid": "swap",
          "data-kind": kind },
          h("svg:title", {}, label),
          h("svg:rect", { x: xa, y, width: w, height: lane, rx: 1 }),
          result !== "ok" && result !== "pending" ? [h("svg:circle", { cx: xa + w / 2, cy: y, r: 7, class: "fail-dot" }),
            h("svg:text", { x: xa + w / 2, y: y + 3.5, "text-anchor": "middle", class: "fail-mark" }, "✕")]
            : kind === "reload" ? [h("svg:circle", { cx: xa + w / 2, cy: y, r: 7, class: "reload-dot" }),
              h("svg:text", { x: xa + w / 2, y: y + 3.5, "text-anchor": "middle", class: "reload-mark" }, "↻")] : null));
      };
      for (const s of mine) {
        if (s.end < t0) continue;
        if (isReload(s)) {
          reloads++;
          mark(s, s.start, s.end, s.result, `model ${swapText(s)}, ${ms(s.durationMs) ?? "load time not reported"}, ` +
            `at ${clock(s.start)} (Jano swapped nothing: the backend loaded it again on its own)`);
          continue;
        }
        shown++;
        if (s.result !== "ok") failed++;
        mark(s, s.start, s.end, s.result, `${swapText(s)}: ${s.result}, ` +
          `${ms(s.durationMs) ?? "duration not reported"}, at ${clock(s.start)}${s.error ? ". " + s.error : ""}`);
      }
      if (pending && isFinite(pendingStart)) mark(null, pendingStart, t1, "pending", `loading ${pending.to} since ${clock(pendingStart)}`);
    });
    axis(svg, x, t0, t1, top + groups.length * (lane + gap) - gap + 2, left, right);
    svg.setAttribute("aria-label", `Swap timeline: ${shown} swap${shown === 1 ? "" : "s"} shown` +
      (failed ? `, ${failed} failed` : "") + (reloads ? `, ${reloads} hidden reload${reloads === 1 ? "" : "s"}` : "") +
      ". The list below has the details.");
    const models = [...state.colors.keys()];
    $("timeline-legend").replaceChildren(...models.map((m) => h("span", {}, modelName(m))),
      h("span", {}, h("span", { class: "swatch swap-key", "aria-hidden": "true" }), "swap (width = its duration)"),
      h("span", {}, h("span", { class: "swatch fail-key", "aria-hidden": "true" }), "failed swap"),
      h("span", {}, h("span", { class: "swatch reload-key", "aria-hidden": "true" }), "reloaded by the backend"));
  }

  function renderSwapList(st) {
    const many = Object.keys(st.groups || {}).length > 1;
    const recent = [...state.swaps.values()].sort((a, b) => b.end - a.end).slice(0, 8);
    update($("swap-list"), [many, recent], () => (recent.length ? recent.map((s) => h("li", { "data-result": s.result, "data-kind": kindOf(s) },
      h("time", { datetime: s.at }, clock(s.end)), many ? ` [${s.group}]` : "", ` ${swapText(s)} `,
      or(ms(s.durationMs), String), " ", isReload(s) ? h("span", { class: "tag reload", title: "the backend loaded the " +
        "model again on its own, though Jano swapped nothing: every request behind it waited" }, "hidden reload")
        : h("span", { class: `result r-${s.result}` }, s.result),
      s.error ? h("span", { class: "err" }, ` ${s.error}`) : "")) : [h("li", { class: "muted" }, "No swaps seen yet.")]));
  }

  function niceCeil(v) {
    if (!(v > 0)) return 0;
    const p = 10 ** Math.floor(Math.log10(v));
    return [1, 2, 2.5, 5, 10].map((m) => m * p).find((c) => c >= v);
  }

  // A chart over [t0, t1] of lines (points [t, v]: a null value, or a gap longer than `gap`
  // ms, lifts the pen) or bars (a series with `width`: each point a bar that wide, from t).
  // Returns false, saying `empty`, when no point has a value.
  function plot(svg, t0, t1, series, { H = 160, empty = "nothing reported in this window", gap = Infinity, ints = false } = {}) {
    const top = 10, bottom = H - 22, left = 44;
    const W = frame(svg, H), right = W - 8;
    const x = (t) => left + ((Math.min(Math.max(t, t0), t1) - t0) / (t1 - t0)) * (right - left);
    axis(svg, x, t0, t1, bottom, left, right);
    let max = 0, any = false;
    for (const s of series) for (const [, v] of s.pts) if (isNum(v)) { max = Math.max(max, v); any = true; }
    if (!any) {
      svg.append(h("svg:text", { x: (left + right) / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, empty));
      return false;
    }
    const ymax = ints ? Math.max(1, Math.ceil(niceCeil(max * 1.1))) : niceCeil(max * 1.1) || 1;
    const y = (v) => bottom - (v / ymax) * (bottom - top);
    for (const v of [0, ymax / 2, ymax]) {
      if (ints && !Number.isInteger(v)) continue;
      svg.append(h("svg:line", { x1: left, x2: right, y1: y(v), y2: y(v), class: "grid" }),
        h("svg:text", { x: left - 6, y: y(v) + 4, "text-anchor": "end", class: "tick" }, num(v, ints || ymax >= 10 ? 0 : 1)));
    }
    for (const s of series) {
      if (s.width) {   // a 0 is a stub on the axis; no bar at all where nothing was sampled
        for (const [t, v] of s.pts) {
          if (!isNum(v)) continue;
          const xa = x(t), w = Math.max(1, x(t + s.width) - xa - 1), hh = Math.max(v > 0 ? 1 : 1.5, bottom - y(v));
          svg.append(h("svg:rect", { x: xa, y: bottom - hh, width: w, height: hh, class: v > 0 ? "bar" : "bar zero",
            style: v > 0 ? `fill:${s.color}` : null, "data-value": v }, h("svg:title", {}, s.title(t, v))));
        }
        continue;
      }
      let d = "", pen = false, lastPoint = null, prev = -Infinity;
      for (const [t, v] of s.pts) {
        if (!isNum(v) || t - prev > gap) pen = false;
        prev = t;
        if (!isNum(v)) continue;
        d += `${pen ? "L" : "M"}${x(t).toFixed(1)} ${y(v).toFixed(1)}`;
        pen = true;
        lastPoint = [t, v];
      }
      if (d) svg.append(h("svg:path", { d, class: "line", style: `stroke:${s.color}`, "data-model": s.name }));
      if (lastPoint) svg.append(h("svg:circle", { cx: x(lastPoint[0]), cy: y(lastPoint[1]), r: 3, style: `fill:${s.color}` }));
    }
    return true;
  }

  function renderTokChart(t0, t1) {
    const pts = state.samples.filter((s) => s.t >= t0 - 2 * POLL_MS);
    const models = [...new Set(pts.flatMap((s) => Object.keys(s.by)))].sort();
    const series = models.map((m) => ({ name: m, color: color(m), pts: pts.map((s) => [s.t, s.by[m]]) }));
    if (!models.length && pts.some((s) => isNum(s.total))) {
      series.push({ name: "all models", color: "var(--fg)", pts: pts.map((s) => [s.t, s.total]) });
    }
    const drawn = plot($("tok-chart"), t0, t1, series, { empty: "no generation speed reported in this window" });
    $("tok-legend").replaceChildren(...(!drawn ? [] : series.map(({ name, pts: ps }) => {
      const latest = ps.length ? ps[ps.length - 1][1] : null;
      return h("span", {}, name === "all models" ? name : modelName(name), " ", isNum(latest) ? `${tokS(latest)} tok/s` : na());
    })));
  }

  /* -- the stored history: charts of the last hour or day, and the callers --- */

  async function loadHistory() {
    const hs = state.hist;
    if (hs.busy) return;
    hs.busy = true;
    hs.due = Date.now() + HISTORY_REFRESH_MS;
    const span = hs.span, now = nowMs(), secs = (t) => (t / 1000).toFixed(3);
    // Only the samples newer than the ones already here: a day is 8,640 of them.
    const known = hs.seriesSpan === span ? hs.series : [];
    const last = known.length ? known[known.length - 1].t : null;
    const got = await Promise.allSettled([
      getJSON(`usage/series?since=${secs(last ?? now - SPANS[span].ms)}`),
      getJSON(`usage/summary?by=model&since=${secs(now - SPANS[span].ms)}`),
      getJSON(`usage/summary?by=caller&since=${secs(now - DAY_MS)}`)]);
    hs.busy = false;
    if (span !== hs.span) { loadHistory(); return; }   // toggled meanwhile
    const [series, models, callers] = got.map((r) => (r.status === "fulfilled" ? r.value.data || [] : null));
    hs.errors = got.filter((r) => r.status === "rejected" && !r.reason.auth)
      .map((r) => (r.reason.name === "AbortError" ? "Jano did not answer in time" : r.reason.message));
    if (series) {
      const fresh = series.map((p) => ({ ...p, t: Date.parse(p.at) })).filter((p) => isFinite(p.t) && !(p.t <= last));
      hs.series = known.concat(fresh).filter((p) => p.t >= now - SPANS[span].ms);
      hs.seriesSpan = span;
    }
    if (models) hs.models = models;
    if (callers) hs.callers = callers;
    hs.at = Date.now();
    renderHistory();
  }

  // Sums of one field per bucket of `size` ms (on the clock): a bucket with no sample, or only
  // nulls, has none (a gap), never a 0.
  function buckets(samples, key, size) {
    const out = new Map();
    for (const p of samples) {
      const b = Math.floor(p.t / size) * size, v = p[key];
      if (!out.has(b)) out.set(b, null);
      if (isNum(v)) out.set(b, (out.get(b) ?? 0) + v);
    }
    return [...out];
  }

  function renderHistory() {
    const hs = state.hist, span = SPANS[hs.span], t1 = nowMs(), t0 = t1 - span.ms;
    const pts = hs.seriesSpan === hs.span ? hs.series.filter((p) => p.t >= t0) : [];
    const loading = hs.seriesSpan !== hs.span;
    const empty = loading ? "loading…" : pts.length ? "nothing reported in these samples"
      : hs.errors.length ? "history not available" : `no samples in the ${span.label} (Jano takes one every 10 s)`;
    const opts = { H: 140, empty, gap: SAMPLE_GAP_MS };
    const line = (name, key, col) => ({ name, color: col, pts: pts.map((p) => [p.t, p[key]]) });
    const sum = (key) => pts.reduce((a, p) => (isNum(p[key]) ? (a ?? 0) + p[key] : a), null);
    const latest = (key) => (pts.length ? pts[pts.length - 1][key] : null);
    const period = (t) => `${clock(Math.max(t, t0))}–${t + span.bucket > t1 ? "now" : clock(t + span.bucket)}`;
    const figure = (v, what) => (v == null ? na() : `${num(v)} ${what}`);

    $("history-note").replaceChildren(loading ? "loading…" : pts.length
      ? `${num(pts.length)} sample${pts.length === 1 ? "" : "s"} in the ${span.label}, the oldest at ${clock(pts[0].t)}` +
        `; refreshed at ${clock(hs.at)}` : `no samples in the ${span.label} yet`,
    ...hs.errors.map((e) => h("span", { class: "err" }, ` (not available: ${e})`)));

    const tok = latest("tokS");
    plot($("hist-tok"), t0, t1, [line("all models", "tokS", "var(--fg)")], opts);
    const byModel = (hs.models || []).filter((r) => r.key != null);
    $("hist-tok-legend").replaceChildren(h("span", {}, "latest sample: ", isNum(tok) ? `${tokS(tok)} tok/s` : na()),
      ...(byModel.length ? [h("span", { class: "muted" }, `per model over the ${span.label}, backend-timed:`),
        ...byModel.map((r) => h("span", { "data-model": r.key }, modelName(r.key), " ",
          or(r.tokS, (v) => `${tokS(v)} tok/s`, "not reported: the backend timed none of its requests")))] : []));

    $("hist-req-cap").textContent = `Requests finished ${span.per}`;
    plot($("hist-req"), t0, t1, [{ width: span.bucket, color: "var(--m0)", pts: buckets(pts, "requests", span.bucket),
      title: (t, v) => `${period(t)}: ${num(v)} request${v === 1 ? "" : "s"} finished` }], { ...opts, ints: true });
    $("hist-req-legend").replaceChildren(h("span", {}, figure(sum("requests"), "in these samples")));

    const depth = latest("queueDepth"), flying = latest("inFlight");
    plot($("hist-queue"), t0, t1, [line("queue depth", "queueDepth", "var(--warn)"), line("in flight", "inFlight", "var(--busy)")],
      { ...opts, ints: true });
    $("hist-queue-legend").replaceChildren(
      h("span", {}, h("span", { class: "swatch", style: "background:var(--warn)", "aria-hidden": "true" }), "queued ", or(depth, String)),
      h("span", {}, h("span", { class: "swatch", style: "background:var(--busy)", "aria-hidden": "true" }), "in flight ", or(flying, String)),
      h("span", { class: "muted" }, "at the latest sample"));

    $("hist-swap-cap").textContent = `Swaps ${span.per}`;
    plot($("hist-swap"), t0, t1, [{ width: span.bucket, color: "var(--swap)", pts: buckets(pts, "swaps", span.bucket),
      title: (t, v) => `${period(t)}: ${num(v)} swap${v === 1 ? "" : "s"}` }], { ...opts, ints: true });
    $("hist-swap-legend").replaceChildren(h("span", {}, figure(sum("swaps"), "in these samples")),
      h("span", { class: "muted" }, "attempts, failed ones included; unloads not counted"));

    renderCallers(hs.callers, hs.errors);
  }

  function renderCallers(rows, errors) {
    $("callers-note").hidden = Boolean(rows && rows.length);
    $("callers-note").textContent = rows ? "No requests in the last 24 hours."
      : errors.length ? `Not available: ${errors.join("; ")}` : "…";
    update($("callers").tBodies[0], rows || [], () => (rows || []).map((r) => h("tr", { "data-testid": "caller-row", "data-caller": r.key ?? "" },
      h("th", { scope: "row" }, r.key ?? h("span", { class: "na", title: "requests with the plain api_key, or with no key" }, "(no named key)")),
      h("td", { class: "n", "data-testid": "caller-requests" }, or(r.requests, num)),
      h("td", { class: "n" }, or(r.completed, num)),
      h("td", { class: isNum(r.errors) && r.errors > 0 ? "n err" : "n" }, or(r.errors, num)),
      h("td", { class: "n" }, or(r.promptTokens, num), " → ", or(r.completionTokens, num)),
      h("td", { class: "n", title: isNum(r.generationSeconds) ? `over ${num(r.generationSeconds, 1)} s of generation the backend timed` : null },
        or(r.tokS, tokS, "not reported: the backend timed none of these requests")),
      h("td", { class: "n" }, or(r.queueWaitP50Ms, ms)),
      h("td", { class: "n" }, or(r.queueWaitP95Ms, ms)))));
  }

  $("history-span").addEventListener("click", (ev) => {
    const b = ev.target.closest("button[data-span]");
    if (!b || b.dataset.span === state.hist.span) return;
    state.hist.span = b.dataset.span;
    for (const x of $("history-span").querySelectorAll("button")) x.setAttribute("aria-pressed", String(x === b));
    renderHistory();
    if (!state.waitingForToken) loadHistory();
  });

  function renderRequests(us) {
    const rows = (us && us.data) || [];
    $("requests-empty").hidden = rows.length > 0;
    update($("requests").tBodies[0], rows, () => rows.map((r) => h("tr", { "data-testid": "request-row", "data-id": r.id, "data-outcome": r.outcome },
      h("td", {}, r.arrivedAt ? h("time", { datetime: r.arrivedAt }, clock(Date.parse(r.arrivedAt))) : na()),
      h("td", {}, r.model ? modelName(r.model) : na("no model")),
      h("td", { class: "n" }, or(r.status, String), r.stream ? h("span", { class: "tag", title: "streamed" }, "stream") : ""),
      h("td", { class: "n" }, or(r.queueWaitMs, ms), r.waitedForSwap ? h("span", { class: "tag busy", title: "waited for a model swap" }, "swap") : ""),
      h("td", { class: "n" }, or(r.ttfbMs, ms)),
      h("td", { class: "n", title: isNum(r.backendLoadMs) ? `the backend reports ${ms(r.backendLoadMs)} loading the model` : null },
        or(r.durationMs, ms)),
      h("td", { class: "n", title: r.usageSource ? `usage from ${r.usageSource}` : "the backend reported no usage" },
        or(r.promptTokens, num), isNum(r.cachedTokens) && r.cachedTokens > 0 ? h("small", {}, ` (${num(r.cachedTokens)} cached)`) : "",
        " → ", or(r.completionTokens, num)),
      h("td", { class: "n", title: isNum(r.promptTokS) ? `prompt: ${num(r.promptTokS)} tok/s` : null },
        or(r.genTokS, tokS), r.genTokSSource === "router" ? h("small", { title: "timed by Jano from the stream, not reported by the backend" }, " est.") : ""),
      h("td", {}, r.outcome ? h("span", { class: `outcome o-${r.outcome}`, title: r.outcome }, OUTCOMES[r.outcome] || r.outcome) : na()),
      h("td", {}, r.caller ?? na("no named key")))));
  }

  function renderTotals(st) {
    const rows = [["Requests", st.requestsTotal, num], ["Served", st.requestsServedTotal, num],
      ["Without usage", st.requestsWithoutUsageTotal, num], ["Tokens generated", st.tokensGeneratedTotal, num],
      ["Prompt tokens", st.promptTokensTotal, num], ["Uptime", st.uptimeSeconds, dur], ["Version", st.version, String]];
    $("totals").replaceChildren(...rows.flatMap(([k, v, f]) => [h("dt", {}, k), h("dd", {}, or(v, f))]));
  }

  /* -- the model server Jano runs itself ------------------------------- */

  const SERVER_LOG_LINES = 15;
  const serverPath = (model) => `logs/${model.split("/").map(encodeURIComponent).join("/")}?tail=${SERVER_LOG_LINES}`;

  // The servers worth showing: each resident model's, when Jano runs it, first; then any
  // other of Jano's servers that is not simply stopped (starting, or crashed and to retry).
  function serverModels(st, procs) {
    const names = new Set(Object.values(st.groups || {})
      .flatMap((g) => (g && (g.residents && g.residents.length ? g.residents : [g.resident])) || [])
      .filter((m) => m != null && procs[m]).sort());
    for (const m of Object.keys(procs).sort()) if (procs[m] && procs[m].state !== "stopped") names.add(m);
    return [...names];
  }

  function renderServer(st) {
    const procs = st.processes && typeof st.processes === "object" ? st.processes : {};
    const panel = $("server-panel"), sv = state.server;
    panel.hidden = !Object.keys(procs).length;   // no managed models (or an older Jano)
    if (panel.hidden) { sv.model = null; return; }
    const names = serverModels(st, procs);
    if (!names.includes(sv.model)) {
      sv.model = names.length ? names[0] : null;
      sv.log = null;
      sv.logError = null;
    }
    const pick = $("server-pick");
    pick.hidden = names.length < 2;
    update(pick, [names, sv.model], () => (names.length < 2 ? [] : names.map((m) =>
      h("button", { type: "button", "data-model": m, "aria-pressed": String(m === sv.model) }, m))));
    const p = sv.model == null ? null : procs[sv.model];
    $("server-none").hidden = p != null;
    $("server-detail").hidden = p == null;
    if (!p) return;
    const stateName = typeof p.state === "string" ? p.state : "unknown";
    const retry = p.retry_at ? Date.parse(p.retry_at) : NaN;
    const facts = [
      ["Model", modelName(sv.model)],
      ["State", h("span", { class: `pstate s-${stateName}`, id: "server-state", "data-testid": "server-state" }, stateName)],
      ["PID", h("span", { id: "server-pid" }, or(p.pid, String, "not running"))],
      ["Port", h("span", { id: "server-port" }, or(p.port, String, "not running"))],
      ["Restarts", h("span", { id: "server-restarts" }, or(p.restarts, String),
        isNum(p.crashes_in_a_row) && p.crashes_in_a_row > 0 ? h("small", {}, ` (${p.crashes_in_a_row} crashes in a row)`) : "")],
      ["Started", p.started_at && p.state === "running"
        ? h("time", { datetime: p.started_at }, `${clock(Date.parse(p.started_at))} (up ${dur(ago(p.started_at))})`) : na("not running")],
    ];
    if (isFinite(retry)) facts.push(["Next try", `${clock(retry)} (in ${dur((retry - nowMs()) / 1000)})`]);
    if (p.last_exit) facts.push(["Last exit", p.last_exit]);
    update($("server-facts"), facts.map(([k, v]) => [k, v instanceof Node ? v.textContent : String(v)]),
      () => facts.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v))));
    $("server-failure-row").hidden = !p.last_failure;
    if ($("server-failure").textContent !== (p.last_failure || "")) $("server-failure").textContent = p.last_failure || "";
    renderServerLog();
  }

  function renderServerLog() {
    const sv = state.server, pre = $("server-log");
    const text = sv.log == null ? "" : sv.log.replace(/\n$/, "");
    if (pre.textContent !== text) {   // untouched otherwise, so a selection survives the poll
      pre.textContent = text;
      pre.scrollTop = pre.scrollHeight;
    }
    $("server-log-note").textContent = sv.logError ? `The log cannot be read now (${sv.logError}).`
      : sv.log === "" ? "No output yet." : "";
  }

  // The last lines of the server shown, with the telemetry token, once per status refresh.
  async function loadServerLog() {
    const sv = state.server, model = sv.model;
    if (model == null || sv.busy || state.waitingForToken) return;
    sv.busy = true;
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), 5000);
    let log = null, error = null;
    try {
      const r = await fetch(BASE + serverPath(model), { cache: "no-store", signal: ctl.signal,
        headers: { Accept: "text/plain", ...bearer(readToken()) } });
      if (r.ok) log = await r.text();
      else error = `HTTP ${r.status}`;
    } catch (e) {
      error = e.name === "AbortError" ? "Jano does not answer" : e.message;
    } finally {
      clearTimeout(timer);
      sv.busy = false;
    }
    if (sv.model !== model) return;   // another server was picked meanwhile
    if (log != null) sv.log = log;
    sv.logError = error;
    renderServerLog();
  }

  $("server-pick").addEventListener("click", (ev) => {
    const b = ev.target.closest("button[data-model]");
    if (!b || b.dataset.model === state.server.model) return;
    Object.assign(state.server, { model: b.dataset.model, log: null, logError: null });
    render();
    loadServerLog();
  });

  /* -- start ------------------------------------------------------------ */

  let pendingFrame = 0;
  window.addEventListener("resize", () => {
    cancelAnimationFrame(pendingFrame);
    pendingFrame = requestAnimationFrame(() => { render(); renderHistory(); });
  });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) poll(); });
  // For tests and debugging: feed a /status and /usage document (or history samples) by hand.
  window.janoDashboard = { show, state, renderHistory };
  renderHistory();
  poll();
})();
