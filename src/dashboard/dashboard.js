// callbridge operator dashboard: live calls, a call's transcript and events, the operator
// actions, process health. Plain JavaScript, no dependencies, served from the binary.
//
// Data comes only from the admin endpoints (`/calls`, `/calls/{sid}`, `/health`, `/events`),
// with the same-origin session cookie. On a 401 the page asks for the admin token once and
// trades it for that cookie (`POST /login`): the token is never put in a URL or in storage.
// Everything shown from the server is set as text (textContent), never parsed as HTML.
"use strict";

(function () {
  const HEALTH_EVERY_MS = 3000;
  const POLL_EVERY_MS = 1000; // `/calls` while the event stream is not connected
  const COUNTERS_EVERY_POLLS = 5; // and every 5 s while it is (frame counters have no events)
  const ENDED_KEEP_MS = 5000; // an ended call stays listed (greyed) this long
  const TIMELINE_MAX = 200;

  const calls = new Map(); // call_sid -> {snap, seenAt, ended}
  const timelines = new Map(); // call_sid -> [{type, ts, data}]
  let selected = null;
  let events = null; // the EventSource
  let started = false;
  let pollTimer = null;
  let healthTimer = null;
  let tickTimer = null;
  let authNeeded = false;

  const $ = (id) => document.getElementById(id);

  function el(tag, props, children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (k === "text") node.textContent = v;
        else if (k === "className") node.className = v;
        else if (k === "dataset") Object.assign(node.dataset, v);
        else node.setAttribute(k, v);
      }
    }
    for (const c of children || []) node.appendChild(c);
    return node;
  }

  // ---- HTTP ------------------------------------------------------------------------------

  class Unauthorized extends Error {}

  async function api(path, options) {
    const opts = Object.assign({ credentials: "same-origin", cache: "no-store" }, options || {});
    opts.headers = Object.assign({ Accept: "application/json" }, opts.headers || {});
    const res = await fetch(path, opts);
    if (res.status === 401) {
      throw new Unauthorized("unauthorized");
    }
    let body = null;
    const type = res.headers.get("content-type") || "";
    if (type.includes("json")) {
      try {
        body = await res.json();
      } catch (_) {
        body = null;
      }
    }
    return { status: res.status, ok: res.ok, body };
  }

  function postJson(path, payload) {
    return api(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(payload),
    });
  }

  // ---- login ------------------------------------------------------------------------------

  function showLogin(message) {
    authNeeded = true;
    stopLive();
    $("main").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    setStream("signed out");
    refreshHealth(); // public: the health bar shows before signing in
    $("login-token").focus();
  }

  async function login(ev) {
    ev.preventDefault();
    const input = $("login-token");
    const token = input.value;
    input.value = ""; // not kept anywhere in the page
    try {
      const res = await fetch("/login", {
        method: "POST",
        credentials: "same-origin",
        cache: "no-store",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ token }),
      });
      if (res.status === 204 || res.ok) {
        $("login").hidden = true;
        authNeeded = false;
        start();
        return;
      }
      let msg = "wrong token";
      try {
        const body = await res.json();
        if (body && typeof body.error === "string") msg = body.error;
      } catch (_) {
        // keep the default message
      }
      $("login-error").textContent = msg;
    } catch (_) {
      $("login-error").textContent = "the server did not answer";
    }
  }

  // ---- health -----------------------------------------------------------------------------

  function fmtUptime(s) {
    if (typeof s !== "number") return "";
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    return "up " + (h ? h + "h " : "") + m + "m";
  }

  async function refreshHealth() {
    let health;
    try {
      const res = await api("/health");
      health = res.body || {};
    } catch (e) {
      if (e instanceof Unauthorized && !authNeeded) showLogin();
      return;
    }
    let draining = health.draining === true;
    if (health.draining === undefined) {
      try {
        const ready = await api("/ready");
        draining = !!(ready.body && ready.body.draining);
      } catch (_) {
        draining = false;
      }
    }
    const status = health.status || "unknown";
    const bar = $("health");
    bar.dataset.status = status;
    bar.dataset.draining = String(draining);
    const pill = $("health-status");
    pill.textContent = status;
    pill.className = "pill " + (status === "healthy" ? "ok" : status === "degraded" ? "bad" : "warn");
    $("health-draining").hidden = !draining;
    const breaker = health.breaker;
    const breakerOpen =
      status === "degraded" ||
      breaker === "open" ||
      (breaker && typeof breaker === "object" && (breaker.open === true || breaker.state === "open"));
    $("health-breaker").hidden = !breakerOpen;
    let upstream = health.upstream || "";
    if (health.api) upstream += " · " + health.api;
    if (health.model) upstream += " · " + health.model;
    $("health-upstream").textContent = upstream;
    const cost = health.usage && typeof health.usage.cost_usd === "number" ? health.usage.cost_usd : null;
    $("health-cost").textContent = cost === null ? "" : "ended calls " + fmtCost(cost);
    $("health-uptime").textContent = fmtUptime(health.uptime_s);
    const reason = health.reason || health.warning || health.security_warning || "";
    $("health-reason").textContent = reason;
    $("health-reason").hidden = !reason;
  }

  // ---- the call list ----------------------------------------------------------------------

  function fmtDuration(ms) {
    const s = Math.max(0, Math.floor(ms / 1000));
    const m = Math.floor(s / 60);
    const r = s % 60;
    return m + ":" + (r < 10 ? "0" : "") + r;
  }

  function fmtCost(c) {
    if (typeof c !== "number") return "–";
    return "$" + c.toFixed(c < 1 ? 4 : 2);
  }

  function durationOf(entry) {
    const base = entry.snap.duration_ms || 0;
    const end = entry.ended || Date.now();
    return base + (end - entry.seenAt);
  }

  function upsert(snap) {
    if (!snap || typeof snap.call_sid !== "string") return;
    const old = calls.get(snap.call_sid);
    if (old && old.ended) return; // it ended; a late snapshot does not bring it back
    const merged = old ? Object.assign({}, old.snap, snap) : snap;
    calls.set(snap.call_sid, { snap: merged, seenAt: Date.now(), ended: null });
  }

  function applyList(list) {
    const snaps = Array.isArray(list) ? list : list && Array.isArray(list.calls) ? list.calls : [];
    const live = new Set();
    for (const s of snaps) {
      live.add(s.call_sid);
      upsert(s);
    }
    for (const [sid, entry] of calls) {
      if (!live.has(sid) && !entry.ended) markEnded(sid, "gone");
    }
    render();
  }

  function markEnded(sid, reason) {
    const entry = calls.get(sid);
    if (!entry || entry.ended) return;
    entry.ended = Date.now();
    entry.snap = Object.assign({}, entry.snap, { state: "ended", end_reason: reason || "" });
    setTimeout(() => {
      const e = calls.get(sid);
      if (e && e.ended) {
        calls.delete(sid);
        timelines.delete(sid);
        render();
      }
    }, ENDED_KEEP_MS);
  }

  function cell(text, className) {
    return el("td", { text: text == null ? "" : String(text), className: className || "" });
  }

  function render() {
    const body = $("calls");
    const rows = [];
    let live = 0;
    for (const [sid, entry] of calls) {
      const s = entry.snap;
      if (!entry.ended) live++;
      const usage = s.usage || {};
      const tr = el("tr", { dataset: { callSid: sid, state: s.state || "" } }, [
        cell(sid, "sid"),
        el("td", {}, [el("span", { className: "pill state", text: s.state || "" })]),
        cell(s.direction || ""),
        cell((s.from || "?") + " → " + (s.to || "?")),
        cell(s.api || s.upstream || ""),
        cell(fmtDuration(durationOf(entry)), "num duration"),
        cell((s.frames_in || 0) + " / " + (s.frames_out || 0), "num"),
        cell(s.barge_ins || 0, "num"),
        cell(s.upstream_restarts || 0, "num"),
        cell(fmtCost(usage.cost_usd), "num"),
      ]);
      if (sid === selected) tr.classList.add("selected");
      tr.addEventListener("click", () => select(sid));
      rows.push(tr);
    }
    body.replaceChildren(...rows);
    $("call-count").textContent = String(live);
    $("health-live").textContent = live + " live";
    $("no-calls").hidden = rows.length > 0;
    if (selected) renderDetailHead();
  }

  function tick() {
    for (const tr of $("calls").children) {
      const entry = calls.get(tr.dataset.callSid);
      const td = tr.querySelector(".duration");
      if (entry && td) td.textContent = fmtDuration(durationOf(entry));
    }
  }

  // ---- one call: transcript, events, actions ----------------------------------------------

  function transcriptLine(role, text, opts) {
    const li = el("li", { dataset: { role: role || "" } }, [
      el("span", { className: "role", text: role || "" }),
      el("span", { className: "text", text: text || "" }),
    ]);
    if (opts && opts.interrupted) {
      const heard = typeof opts.heard_ms === "number" ? " after " + opts.heard_ms + " ms" : "";
      li.appendChild(el("span", { className: "note", text: "(interrupted" + heard + ")" }));
    }
    if (opts && opts.partial) li.classList.add("partial");
    return li;
  }

  // Final transcript lines that arrived by event while the call's snapshot was being fetched:
  // the snapshot may predate them, so they are added after it unless it already has them.
  let arrivedWhileLoading = null;

  async function loadTranscript(sid) {
    arrivedWhileLoading = [];
    try {
      const res = await api("/calls/" + encodeURIComponent(sid));
      if (selected !== sid) return;
      if (res.status === 404) {
        markEnded(sid, "gone");
        render();
        return;
      }
      if (!res.ok || !res.body) return;
      upsert(res.body);
      const fetched = res.body.transcript || [];
      const lines = fetched.map((t) => transcriptLine(t.role, t.text, t));
      const tail = fetched.slice(-Math.max(arrivedWhileLoading.length, 1));
      for (const d of arrivedWhileLoading) {
        if (!tail.some((t) => t.role === d.role && t.text === d.text)) {
          lines.push(transcriptLine(d.role, d.text, d));
        }
      }
      const list = $("transcript");
      const partials = [...list.querySelectorAll("li.partial")];
      list.replaceChildren(...lines, ...partials);
      list.scrollTop = list.scrollHeight;
      render();
    } catch (e) {
      if (e instanceof Unauthorized) showLogin();
    } finally {
      arrivedWhileLoading = null;
    }
  }

  function renderTimeline() {
    const items = (timelines.get(selected) || []).map((ev) =>
      el("li", { dataset: { type: ev.type } }, [
        el("span", { className: "ts", text: fmtTs(ev.ts) }),
        el("span", { className: "type", text: ev.type }),
        el("span", { className: "what", text: summary(ev.type, ev.data) }),
      ])
    );
    const list = $("timeline");
    list.replaceChildren(...items);
    list.scrollTop = list.scrollHeight;
  }

  function fmtTs(ts) {
    const d = typeof ts === "number" ? new Date(ts) : typeof ts === "string" ? new Date(ts) : new Date();
    if (isNaN(d.getTime())) return String(ts);
    return d.toLocaleTimeString([], { hour12: false });
  }

  function summary(type, d) {
    switch (type) {
      case "state":
        return d.state || "";
      case "transcript":
        return (d.role || "") + ": " + (d.text || "") + (d.final === false ? " …" : "");
      case "barge_in":
        return typeof d.heard_ms === "number" ? "heard " + d.heard_ms + " ms" : "";
      case "dtmf":
        return d.digit || "";
      case "restart":
      case "rollover":
        return d.reason || "";
      case "error":
        return d.code || "";
      case "tool_call":
        return (d.name || "") + " " + (d.outcome || "") + (typeof d.ms === "number" ? " " + d.ms + " ms" : "");
      case "usage":
        if (typeof d.cost_usd === "number") return fmtCost(d.cost_usd);
        return "";
      case "ended":
        return d.reason || "";
      default:
        return "";
    }
  }

  function renderDetailHead() {
    const entry = calls.get(selected);
    $("detail-sid").textContent = selected || "";
    const state = entry ? entry.snap.state || "" : "ended";
    const pill = $("detail-state");
    pill.textContent = state;
    pill.className = "pill " + (state === "active" ? "ok" : state === "ended" || state === "ending" ? "bad" : "warn");
    const over = !entry || !!entry.ended;
    for (const b of document.querySelectorAll("#actions button, .action-form button[data-confirm]")) {
      b.disabled = over;
    }
  }

  function select(sid) {
    if (selected !== sid) {
      selected = sid;
      $("transcript").replaceChildren();
      $("action-result").textContent = "";
      $("action-result").className = "";
      closeForms();
    }
    $("detail").hidden = false;
    $("detail").dataset.detailSid = sid;
    render();
    renderTimeline();
    loadTranscript(sid);
  }

  function closeDetail() {
    selected = null;
    $("detail").hidden = true;
    delete $("detail").dataset.detailSid;
    render();
  }

  function closeForms() {
    for (const f of document.querySelectorAll(".action-form")) f.hidden = true;
  }

  function openForm(action) {
    closeForms();
    const form = document.querySelector('.action-form[data-form="' + action + '"]');
    if (!form) return;
    form.hidden = false;
    const first = form.querySelector("input");
    if (first) first.focus();
  }

  async function submitAction(ev) {
    ev.preventDefault();
    const form = ev.currentTarget;
    const action = form.dataset.form;
    const sid = selected;
    if (!sid) return;
    const value = (name) => {
      const input = form.querySelector('[data-input="' + name + '"]');
      return input ? input.value.trim() : "";
    };
    let payload;
    if (action === "hangup") {
      payload = {};
      if (value("goodbye")) payload.goodbye = value("goodbye");
    } else if (action === "transfer") {
      payload = { to: value("to") };
      if (value("announce")) payload.announce = value("announce");
    } else {
      payload = { text: value("text") };
    }
    const result = $("action-result");
    result.className = "";
    result.textContent = action + "…";
    try {
      const res = await postJson("/calls/" + encodeURIComponent(sid) + "/" + action, payload);
      if (res.status === 202 || res.ok) {
        result.textContent = action + ": accepted";
        result.dataset.result = "accepted";
        form.reset();
        form.hidden = true;
      } else {
        const msg = res.body && typeof res.body.error === "string" ? res.body.error : "HTTP " + res.status;
        result.textContent = action + " refused: " + msg;
        result.dataset.result = "refused";
        result.className = "error";
        if (res.status === 404) markEnded(sid, "gone");
      }
    } catch (e) {
      if (e instanceof Unauthorized) {
        showLogin();
        return;
      }
      result.textContent = action + ": the server did not answer";
      result.dataset.result = "failed";
      result.className = "error";
    }
  }

  // ---- the event stream -------------------------------------------------------------------

  function record(type, data) {
    const sid = data.call_sid;
    if (typeof sid !== "string") return;
    let list = timelines.get(sid);
    if (!list) {
      list = [];
      timelines.set(sid, list);
    }
    list.push({ type, ts: data.ts, data });
    if (list.length > TIMELINE_MAX) list.splice(0, list.length - TIMELINE_MAX);
    if (sid === selected) renderTimeline();
  }

  function onTranscript(d) {
    if (d.call_sid !== selected) return;
    const list = $("transcript");
    const partial = [...list.querySelectorAll("li.partial")].find((li) => li.dataset.role === (d.role || ""));
    if (d.final === false) {
      const line = transcriptLine(d.role, d.text, { partial: true });
      if (partial) partial.replaceWith(line);
      else list.appendChild(line);
    } else {
      if (arrivedWhileLoading) arrivedWhileLoading.push(d);
      const line = transcriptLine(d.role, d.text, d);
      if (partial) partial.replaceWith(line);
      else list.appendChild(line);
    }
    list.scrollTop = list.scrollHeight;
  }

  function handle(type, raw) {
    let d;
    try {
      d = JSON.parse(raw);
    } catch (_) {
      return;
    }
    if (!d || typeof d !== "object") return;
    record(type, d);
    const sid = d.call_sid;
    const entry = calls.get(sid);
    switch (type) {
      case "state":
        if (entry && !entry.ended) {
          entry.snap = Object.assign({}, entry.snap, { state: d.state });
        } else if (!entry) {
          // a new call: its details come with the snapshot
          upsert({ call_sid: sid, state: d.state, duration_ms: 0 });
          refreshCalls();
        }
        break;
      case "transcript":
        onTranscript(d);
        break;
      case "barge_in":
        if (entry) entry.snap.barge_ins = (entry.snap.barge_ins || 0) + 1;
        break;
      case "restart":
        if (entry) entry.snap.upstream_restarts = (entry.snap.upstream_restarts || 0) + 1;
        break;
      case "usage":
        if (entry && typeof d.cost_usd === "number") {
          entry.snap.usage = Object.assign({}, entry.snap.usage || {}, { cost_usd: d.cost_usd });
        }
        break;
      case "ended":
        markEnded(sid, d.reason);
        break;
      default:
        break;
    }
    render();
  }

  const EVENT_TYPES = [
    "state", "transcript", "barge_in", "dtmf", "restart", "rollover",
    "error", "tool_call", "usage", "ended",
  ];

  function setStream(state) {
    const s = $("stream-status");
    s.dataset.stream = state;
    s.textContent = "events: " + state;
  }

  function connectEvents() {
    if (typeof EventSource === "undefined") {
      setStream("unsupported (polling)");
      return;
    }
    events = new EventSource("/events");
    events.addEventListener("open", () => {
      setStream("live");
      // catch up with anything missed while not connected
      refreshCalls();
    });
    events.addEventListener("error", () => {
      setStream(events && events.readyState === EventSource.CLOSED ? "unavailable (polling)" : "reconnecting");
      if (events && events.readyState === EventSource.CLOSED) {
        // the browser gave up (a refused stream): maybe the session expired
        checkAuth();
      }
    });
    for (const type of EVENT_TYPES) {
      events.addEventListener(type, (ev) => handle(type, ev.data));
    }
  }

  async function checkAuth() {
    try {
      await api("/calls");
    } catch (e) {
      if (e instanceof Unauthorized) showLogin();
    }
  }

  function streamLive() {
    return events !== null && events.readyState === EventSource.OPEN;
  }

  async function refreshCalls() {
    try {
      const res = await api("/calls");
      if (res.ok) applyList(res.body);
    } catch (e) {
      if (e instanceof Unauthorized) showLogin();
    }
  }

  let polls = 0;

  async function poll() {
    // The event stream keeps the page current; without it, poll. With it, the counters (frames,
    // drops) that have no events are refreshed every few seconds.
    if (authNeeded) return;
    polls += 1;
    if (streamLive() && polls % COUNTERS_EVERY_POLLS === 0) {
      await refreshCalls();
    } else if (!streamLive()) {
      await refreshCalls();
      if (selected && calls.has(selected) && !calls.get(selected).ended) loadTranscript(selected);
    }
  }

  // ---- start ------------------------------------------------------------------------------

  function stopLive() {
    started = false;
    if (events) {
      events.close();
      events = null;
    }
    for (const t of [pollTimer, healthTimer, tickTimer]) if (t) clearInterval(t);
    pollTimer = healthTimer = tickTimer = null;
  }

  async function start() {
    if (started) return;
    let res;
    try {
      res = await api("/calls");
    } catch (e) {
      if (e instanceof Unauthorized) {
        showLogin();
        return;
      }
      setStream("server unreachable");
      setTimeout(start, POLL_EVERY_MS);
      return;
    }
    started = true;
    authNeeded = false;
    $("login").hidden = true;
    $("main").hidden = false;
    if (res.ok) applyList(res.body);
    refreshHealth();
    connectEvents();
    pollTimer = setInterval(poll, POLL_EVERY_MS);
    healthTimer = setInterval(refreshHealth, HEALTH_EVERY_MS);
    tickTimer = setInterval(tick, 1000);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", login);
    $("detail-close").addEventListener("click", closeDetail);
    for (const b of document.querySelectorAll("#actions button[data-action]")) {
      b.addEventListener("click", () => openForm(b.dataset.action));
    }
    for (const f of document.querySelectorAll(".action-form")) {
      f.addEventListener("submit", submitAction);
      const cancel = f.querySelector("[data-cancel]");
      if (cancel) cancel.addEventListener("click", () => { f.reset(); f.hidden = true; });
    }
    document.addEventListener("keydown", (ev) => {
      if (ev.key === "Escape") closeForms();
    });
    start();
  });
})();
