// The Switchboard dashboard. Plain JavaScript, no build step.
//
// Auth: the API key lives in this tab's sessionStorage only and goes out
// as `Authorization: Bearer` on API calls. The live stream (EventSource,
// which cannot send headers) opens with a single-use ticket from
// POST /api/stats/ticket, so the key never appears in a URL.
"use strict";

(function () {
  const KEY = "switchboard.apiKey";
  const WINDOW_SECONDS = 300; // the chart shows the last 5 minutes
  const PAGE = 50;

  const $ = (id) => document.getElementById(id);
  const state = {
    source: null,
    last: null,
    series: [[], [], [], []], // time, in/s, out/s, deliveries/s
    chart: null,
    ids: {
      after: null, cursors: [], next: null, loading: false, reloadWanted: false,
      lastLoadedAt: 0, lastTookMs: 0, timer: null, stale: false,
    },
    topics: { after: null, next: null },
    reconnectTimer: null,
  };

  function key() {
    return sessionStorage.getItem(KEY);
  }

  async function api(path, options = {}) {
    const headers = Object.assign({}, options.headers || {});
    const k = key();
    if (k) headers.Authorization = "Bearer " + k;
    const response = await fetch(path, Object.assign({}, options, { headers }));
    let body = null;
    const type = response.headers.get("content-type") || "";
    if (type.startsWith("application/json")) body = await response.json();
    if (response.status === 401) {
      showLogin(body && body.error ? describe(body.error) : "This server needs an API key.");
      throw new Error("unauthorized");
    }
    if (!response.ok) {
      const err = new Error(body && body.error ? describe(body.error) : "HTTP " + response.status);
      err.status = response.status;
      throw err;
    }
    return body;
  }

  function describe(error) {
    return error.message + " (" + error.code + ")";
  }

  function text(el, value) {
    el.textContent = value;
  }

  function cell(row, value, className) {
    const td = document.createElement("td");
    td.textContent = value;
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  function fmt(n) {
    if (n === null || n === undefined || Number.isNaN(n)) return "–";
    if (n >= 100) return Math.round(n).toLocaleString("en-US");
    return (Math.round(n * 10) / 10).toLocaleString("en-US");
  }

  function when(ms) {
    return new Date(ms).toLocaleTimeString();
  }

  // ---- login -------------------------------------------------------------

  function showLogin(message) {
    stopStream();
    $("login").hidden = false;
    $("main").hidden = true;
    $("nav").hidden = true;
    $("logout").hidden = true;
    text($("live"), "offline");
    $("live").classList.remove("on");
    text($("login-error"), key() ? message : "");
    if (key()) sessionStorage.removeItem(KEY);
    $("api-key").focus();
  }

  function showMain() {
    $("login").hidden = true;
    $("main").hidden = false;
    $("nav").hidden = false;
    $("logout").hidden = !key();
  }

  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("api-key").value.trim();
    if (!value) return;
    sessionStorage.setItem(KEY, value);
    $("api-key").value = "";
    start();
  });

  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    showLogin("");
    text($("login-error"), "");
  });

  // ---- live stream -------------------------------------------------------

  function stopStream() {
    if (state.source) state.source.close();
    state.source = null;
    clearTimeout(state.reconnectTimer);
  }

  async function openStream() {
    stopStream();
    let ticket;
    try {
      ticket = await api("/api/stats/ticket", { method: "POST" });
    } catch (err) {
      if (err.message !== "unauthorized") retryStream();
      return;
    }
    showMain();
    const source = new EventSource("/api/stats/stream?ticket=" + encodeURIComponent(ticket.ticket));
    state.source = source;
    source.addEventListener("stats", (event) => {
      text($("live"), "live");
      $("live").classList.add("on");
      onStats(JSON.parse(event.data));
    });
    source.addEventListener("error", () => {
      // The ticket is spent: EventSource's own retry would be refused.
      source.close();
      text($("live"), "reconnecting");
      $("live").classList.remove("on");
      retryStream();
    });
  }

  function retryStream() {
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = setTimeout(openStream, 1000);
  }

  function onStats(s) {
    const prev = state.last;
    state.last = s;
    const node = s.backend.node ? "node " + s.backend.node + " · " : "";
    text($("node-line"), node + s.backend.backend + " backend · " + when(s.at_unix_ms));
    text($("stat-open"), fmt(s.connections_open));
    text($("stat-dropped"), fmt(s.dropped_messages));
    text($("stat-refusals"), fmt(s.refusals_total));
    if (prev && s.at_unix_ms > prev.at_unix_ms) {
      const dt = (s.at_unix_ms - prev.at_unix_ms) / 1000;
      const rate = (field) => Math.max(0, (s[field] - prev[field]) / dt);
      const rIn = rate("frames_in");
      const rOut = rate("frames_out");
      const rDel = rate("deliveries") + rate("publish_deliveries");
      text($("stat-in"), fmt(rIn));
      text($("stat-out"), fmt(rOut));
      text($("stat-deliveries"), fmt(rDel));
      pushPoint(s.at_unix_ms / 1000, rIn, rOut, rDel);
    }
    renderErrors(s.errors);
    renderRefusals(s.recent_refusals);
    renderNodes(s);
    if (!prev || prev.connections_total !== s.connections_total || prev.connections_open !== s.connections_open) {
      autoReloadIds();
    }
  }

  // The client list follows connects and disconnects, but a page costs the
  // server one pass over its IDs (~27 ms with 100,000): an automatic reload
  // waits at least 20 times as long as the last one took (so it costs the
  // server at most ~5% of a core with 100,000 IDs), and none happens while
  // the tab is hidden.
  function autoReloadIds() {
    const ids = state.ids;
    if (document.hidden) {
      ids.stale = true;
      return;
    }
    const wait = ids.lastLoadedAt + 20 * ids.lastTookMs - performance.now();
    if (wait <= 0) {
      loadIds(ids.after, true);
    } else if (!ids.timer) {
      ids.timer = setTimeout(() => {
        ids.timer = null;
        loadIds(ids.after, true);
      }, wait);
    }
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && state.ids.stale) {
      state.ids.stale = false;
      loadIds(state.ids.after, true);
    }
  });

  // ---- chart -------------------------------------------------------------

  function pushPoint(t, rIn, rOut, rDel) {
    const [ts, a, b, c] = state.series;
    ts.push(t);
    a.push(rIn);
    b.push(rOut);
    c.push(rDel);
    while (ts.length && ts[0] < t - WINDOW_SECONDS) {
      ts.shift();
      a.shift();
      b.shift();
      c.shift();
    }
    const el = $("chart");
    el.dataset.points = String(ts.length);
    el.dataset.lastIn = String(rIn);
    el.dataset.lastOut = String(rOut);
    el.dataset.lastDeliveries = String(rDel);
    if (!state.chart) {
      if (typeof uPlot === "undefined") return;
      state.chart = new uPlot(chartOptions(el), state.series, el);
    } else {
      state.chart.setData(state.series);
    }
  }

  function chartOptions(el) {
    return {
      width: Math.max(300, el.clientWidth || 800),
      height: 250,
      series: [
        {},
        { label: "in /s", stroke: "#0b57d0", width: 2 },
        { label: "out /s", stroke: "#116329", width: 2 },
        { label: "deliveries /s", stroke: "#b45309", width: 2, dash: [6, 4] },
      ],
      axes: [{}, { label: "messages /s" }],
      scales: { y: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } },
    };
  }

  window.addEventListener("resize", () => {
    if (state.chart) state.chart.setSize({ width: Math.max(300, $("chart").clientWidth), height: 250 });
  });

  // ---- tables ------------------------------------------------------------

  function renderErrors(errors) {
    const body = $("errors-body");
    body.replaceChildren();
    const kinds = Object.keys(errors).sort((a, b) => errors[b] - errors[a] || a.localeCompare(b));
    for (const kind of kinds) {
      const row = document.createElement("tr");
      cell(row, kind);
      cell(row, fmt(errors[kind]), errors[kind] > 0 ? "bad" : "muted");
      body.appendChild(row);
    }
  }

  function renderRefusals(refusals) {
    const body = $("refusals-body");
    body.replaceChildren();
    if (!refusals.length) {
      const row = document.createElement("tr");
      cell(row, "None since start.", "muted").colSpan = 5;
      body.appendChild(row);
    }
    for (const r of refusals.slice().reverse()) {
      const row = document.createElement("tr");
      cell(row, when(r.at_unix_ms));
      cell(row, r.route || "–");
      cell(row, String(r.status));
      cell(row, r.code);
      cell(row, r.client || "–");
      body.appendChild(row);
    }
  }

  function renderNodes(s) {
    const b = s.backend;
    text($("backend-line"), b.healthy
      ? "Backend " + b.backend + ": healthy" + (b.node ? " (this node: " + b.node + ")" : "")
      : "Backend " + b.backend + ": DEGRADED — " + (b.reason || "unknown reason"));
    $("backend-line").className = b.healthy ? "ok" : "bad";
    const body = $("nodes-body");
    body.replaceChildren();
    const single = !s.nodes;
    const nodes = s.nodes || [{
      node: b.node || "this server", alive: true, this_node: true,
      ids: null, connections: s.connections_open, member: "– (single node)",
    }];
    for (const n of nodes) {
      const row = document.createElement("tr");
      row.dataset.node = n.node;
      cell(row, n.node + (n.this_node && !single ? " (this node)" : ""));
      const healthy = n.alive && (!n.this_node || b.healthy);
      cell(row, healthy ? "alive" : (n.alive ? "degraded" : "missed heartbeats"), healthy ? "ok" : "bad");
      cell(row, n.ids === null ? "–" : fmt(n.ids));
      cell(row, fmt(n.connections));
      cell(row, n.member, "muted");
      body.appendChild(row);
    }
  }

  // ---- client IDs --------------------------------------------------------

  async function loadIds(after, quiet) {
    const ids = state.ids;
    if (ids.loading) {
      ids.reloadWanted = true;
      return;
    }
    ids.loading = true;
    const started = performance.now();
    try {
      const params = new URLSearchParams({ limit: String(PAGE) });
      const prefix = $("ids-prefix").value.trim();
      if (prefix) params.set("prefix", prefix);
      if (after) params.set("after", after);
      const page = await api("/api/ids?" + params);
      ids.after = after;
      ids.next = page.next;
      renderIds(page);
    } catch (err) {
      if (!quiet && err.message !== "unauthorized") text($("ids-status"), err.message);
    } finally {
      ids.lastLoadedAt = performance.now();
      ids.lastTookMs = ids.lastLoadedAt - started;
      ids.loading = false;
      if (ids.reloadWanted) {
        ids.reloadWanted = false;
        loadIds(ids.after, true);
      }
    }
  }

  function renderIds(page) {
    const body = $("ids-body");
    body.replaceChildren();
    if (!page.ids.length) {
      const row = document.createElement("tr");
      cell(row, "No client ID" + ($("ids-prefix").value.trim() ? " with this prefix." : " connected."), "muted").colSpan = 4;
      body.appendChild(row);
    }
    for (const c of page.ids) {
      const row = document.createElement("tr");
      row.dataset.id = c.id;
      cell(row, c.id);
      cell(row, String(c.connections));
      cell(row, when(c.connected_since_unix_ms));
      const td = document.createElement("td");
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = "Disconnect";
      button.setAttribute("aria-label", "Disconnect " + c.id);
      button.addEventListener("click", () => disconnect(c.id, button));
      td.appendChild(button);
      row.appendChild(td);
      body.appendChild(row);
    }
    $("ids-next").disabled = !state.ids.next;
    $("ids-first").disabled = !state.ids.after;
    text($("ids-page"), state.ids.after ? "after " + state.ids.after : "first page");
  }

  async function disconnect(id, button) {
    button.disabled = true;
    try {
      const answer = await api("/api/connections/" + encodeURIComponent(id), { method: "DELETE" });
      text($("ids-status"), "Closed " + answer.closed + " connection(s) of " + id + " with code 4000.");
    } catch (err) {
      if (err.message !== "unauthorized") text($("ids-status"), "Could not disconnect " + id + ": " + err.message);
      button.disabled = false;
    }
  }

  $("ids-search").addEventListener("submit", (event) => {
    event.preventDefault();
    state.ids.cursors = [];
    loadIds(null, false);
  });
  $("ids-first").addEventListener("click", () => {
    state.ids.cursors = [];
    loadIds(null, false);
  });
  $("ids-next").addEventListener("click", () => {
    if (state.ids.next) {
      state.ids.cursors.push(state.ids.after);
      loadIds(state.ids.next, false);
    }
  });

  // ---- topics ------------------------------------------------------------

  async function loadTopics(after) {
    const params = new URLSearchParams({ limit: String(PAGE) });
    const prefix = $("topics-prefix").value.trim();
    if (prefix) params.set("prefix", prefix);
    if (after) params.set("after", after);
    try {
      const page = await api("/api/topics?" + params);
      state.topics.after = after;
      state.topics.next = page.next;
      const body = $("topics-body");
      body.replaceChildren();
      if (!page.topics.length) {
        const row = document.createElement("tr");
        cell(row, "No topic with a subscriber on this node.", "muted").colSpan = 3;
        body.appendChild(row);
      }
      for (const t of page.topics) {
        const row = document.createElement("tr");
        row.dataset.topic = t.topic;
        cell(row, t.topic);
        cell(row, String(t.subscribers));
        loadPresence(t.topic, cell(row, "…", "muted"));
        body.appendChild(row);
      }
      $("topics-next").disabled = !page.next;
      $("topics-first").disabled = !after;
    } catch (err) {
      /* a 401 shows the login form */
    }
  }

  // A topic's switchboard.v1 presence over the whole cluster: the member
  // count, and the members (with their connections) in a disclosure. One
  // request per listed topic, only when a page of topics is loaded.
  async function loadPresence(topic, target) {
    const path = topic.split("/").map(encodeURIComponent).join("/");
    try {
      const p = await api("/api/presence/" + path + "?mode=full");
      const label = p.count === 1 ? "1 member" : fmt(p.count) + " members";
      target.className = "";
      target.dataset.members = String(p.count);
      if (!p.members || !p.members.length) {
        target.textContent = p.truncated ? label + " (too many to list)" : label;
        return;
      }
      const details = document.createElement("details");
      const summary = document.createElement("summary");
      summary.textContent = label;
      const list = document.createElement("ul");
      for (const m of p.members) {
        const item = document.createElement("li");
        item.textContent = m.id + (m.conns === 1 ? " (1 connection)" : " (" + m.conns + " connections)");
        list.appendChild(item);
      }
      details.append(summary, list);
      target.replaceChildren(details);
    } catch (err) {
      target.textContent = "–";
      target.title = err.message;
    }
  }

  $("topics-search").addEventListener("submit", (event) => {
    event.preventDefault();
    loadTopics(null);
  });
  $("topics-first").addEventListener("click", () => loadTopics(null));
  $("topics-next").addEventListener("click", () => {
    if (state.topics.next) loadTopics(state.topics.next);
  });

  // ---- send --------------------------------------------------------------

  function mode() {
    return document.querySelector("input[name=mode]:checked").value;
  }

  for (const radio of document.querySelectorAll("input[name=mode]")) {
    radio.addEventListener("change", () => {
      $("targets-field").hidden = mode() !== "ids";
      $("topic-field").hidden = mode() !== "topic";
    });
  }

  function report(nodes) {
    $("send-report").replaceChildren(...nodes);
  }

  function para(value, className) {
    const p = document.createElement("p");
    p.textContent = value;
    if (className) p.className = className;
    return p;
  }

  $("send-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    let payload;
    try {
      payload = JSON.parse($("send-payload").value);
    } catch (err) {
      report([para("The payload is not JSON: " + err.message, "error")]);
      $("send-payload").focus();
      return;
    }
    const json = { "Content-Type": "application/json" };
    try {
      if (mode() === "ids") {
        const targets = $("send-targets").value.split(/[\s,]+/).filter(Boolean);
        if (!targets.length) {
          report([para("Name at least one client ID.", "error")]);
          $("send-targets").focus();
          return;
        }
        const answer = await api("/api/send", { method: "POST", headers: json, body: JSON.stringify({ targets, payload }) });
        const lists = ["delivered", "offline", "dropped", "unconfirmed"].filter((k) => answer[k]);
        const table = document.createElement("table");
        table.id = "send-report-table";
        for (const k of lists) {
          const row = document.createElement("tr");
          const th = document.createElement("th");
          th.scope = "row";
          th.textContent = k;
          row.appendChild(th);
          cell(row, answer[k].length + (answer[k].length ? ": " + answer[k].join(", ") : ""), k === "delivered" ? "ok" : (answer[k].length ? "bad" : ""));
          row.dataset.list = k;
          table.appendChild(row);
        }
        report([table]);
      } else {
        const topic = $("send-topic").value.trim();
        const answer = await api("/api/publish", { method: "POST", headers: json, body: JSON.stringify({ topic, payload }) });
        report([para("Published to " + topic + ": " + answer.recipients + " recipient connection(s).", "ok")]);
      }
    } catch (err) {
      if (err.message !== "unauthorized") report([para("Refused: " + err.message, "error")]);
    }
  });

  // ---- start -------------------------------------------------------------

  function start() {
    text($("login-error"), "");
    openStream().then(() => {
      if (!$("main").hidden) {
        loadIds(null, false);
        loadTopics(null);
      }
    });
  }

  start();
})();
