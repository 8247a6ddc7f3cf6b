// diary-ws console: plain JavaScript, no build step. Everything it shows is set with textContent (never
// parsed as HTML), so user ids and messages cannot inject markup. Every URL is relative to this page, so the
// console works under any ROOT_PATH prefix.
"use strict";

(() => {
  const POLL_MS = 2000;
  const HEARTBEAT_S = 15; // the live feed asks for ?heartbeat= so that it can tell a quiet line from a dead one
  const FEED_MAX = 200;
  const USER_ID = /^[A-Za-z0-9_.:@-]{1,128}$/;

  const $ = (id) => document.getElementById(id);

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (className) node.className = className;
    return node;
  }

  function isUserId(value) {
    return USER_ID.test(value) && value !== "." && value !== "..";
  }

  function apiHeaders(extra) {
    const headers = Object.assign({}, extra);
    const key = $("api-key").value.trim();
    if (key) headers["X-API-Key"] = key;
    return headers;
  }

  // The server's error body is {"status": "error", "message": "..."}; fall back to the status line.
  async function problem(response) {
    try {
      const body = await response.json();
      if (body && typeof body.message === "string") return `${response.status}: ${body.message}`;
    } catch (_) {
      // not JSON: the status line has to do
    }
    return `${response.status} ${response.statusText}`;
  }

  function show(node, text, kind) {
    node.textContent = text;
    node.hidden = !text;
    node.classList.toggle("error", kind === "error");
    node.classList.toggle("ok", kind === "ok");
  }

  // --- the overview: users with their counts, rates, stalls and nodes, polled ----------------------------

  async function poll() {
    try {
      const response = await fetch("console/overview?limit=200", { headers: apiHeaders(), cache: "no-store" });
      if (!response.ok) throw new Error(await problem(response));
      const overview = await response.json();
      $("count-users").textContent = String(overview.connected_users);
      $("count-connections").textContent = String(overview.total_connections);
      renderUsers(overview.users, overview.connected_users);
      renderRates(overview.rates);
      renderStalls(overview.stalls, overview.rates, overview.loop);
      renderNodes(overview.nodes);
      show($("status-error"), "");
      $("server-state").textContent = `Server up · updated ${new Date().toLocaleTimeString()}`;
    } catch (error) {
      show($("status-error"), `Could not read the status: ${error.message}`, "error");
      $("server-state").textContent = "Status unavailable";
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  function renderUsers(users, total) {
    const items = users.map(({ user_id: id, connections }) => {
      const chip = el("button", undefined, "chip");
      chip.type = "button";
      chip.title = `Send to ${id}`;
      chip.append(el("span", id, "chip-id"), el("span", `×${connections}`, "chip-count"));
      chip.addEventListener("click", () => addRecipient(id));
      const drop = el("button", "Disconnect", "secondary small-button");
      drop.type = "button";
      drop.title = `Close every connection of ${id}`;
      drop.addEventListener("click", () => disconnect(id, connections));
      const item = el("li", undefined, "user");
      item.dataset.user = id;
      item.append(chip, drop);
      return item;
    });
    $("user-list").replaceChildren(...items);
    $("users-empty").hidden = total > 0;
    show($("users-more"), total > users.length ? `…and ${total - users.length} more` : "");
  }

  async function disconnect(id, connections) {
    const noun = connections === 1 ? "connection" : "connections";
    if (!window.confirm(`Disconnect ${id}? Their ${connections} ${noun} close with code 4003 (clients may reconnect).`)) {
      return;
    }
    const result = $("disconnect-result");
    show(result, `Disconnecting ${id}…`);
    try {
      const response = await fetch(`users/${encodeURIComponent(id)}/connections`, {
        method: "DELETE", headers: apiHeaders(), cache: "no-store",
      });
      if (!response.ok) throw new Error(await problem(response));
      const answer = await response.json();
      show(result, answer.message, "ok");
    } catch (error) {
      show(result, `Not disconnected: ${error.message}`, "error");
    }
  }

  function formatRate(value) {
    if (value >= 100) return value.toFixed(0);
    if (value >= 10) return value.toFixed(1);
    return value.toFixed(2);
  }

  function formatSeconds(value) {
    if (value >= 1) return `${value.toFixed(2)} s`;
    return `${(value * 1000).toFixed(value >= 0.01 ? 0 : 1)} ms`;
  }

  // A sparkline: one SVG polyline, its points scaled to the view box (the element stretches with the card).
  function spark(id, values) {
    const svg = $(id);
    if (values.length === 1) values = [values[0], values[0]]; // one interval so far: a flat line, not a dot
    const top = Math.max(...values, 1e-9);
    const step = values.length > 1 ? 120 / (values.length - 1) : 0;
    const points = values.map((v, i) => `${(i * step).toFixed(1)},${(23 - (v / top) * 22).toFixed(1)}`).join(" ");
    const line = document.createElementNS(svg.namespaceURI, "polyline"); // the SVG namespace, no URL typed here
    line.setAttribute("points", points);
    svg.replaceChildren(line);
  }

  function renderRates(rates) {
    const last = rates[rates.length - 1];
    for (const name of ["publishes", "deliveries", "handshakes"]) {
      $(`rate-${name}`).textContent = last ? formatRate(last[name]) : "–";
      spark(`spark-${name}`, rates.map((rate) => rate[name]));
    }
  }

  function renderStalls(stalls, rates, loop) {
    const worst = rates.reduce((most, rate) => Math.max(most, rate.worst_stall), 0);
    $("stall-worst").textContent = rates.length ? formatSeconds(worst) : "–";
    spark("spark-stalls", rates.map((rate) => rate.worst_stall));
    $("stall-over").textContent = String(stalls.over_50ms);
    $("loop-lag").textContent = formatSeconds(stalls.lag);
    $("loop-name").textContent = loop;
  }

  function renderNodes(nodes) {
    const now = Date.now() / 1000;
    const rows = nodes.map((node) => {
      const row = el("tr");
      const name = el("td", undefined, "node-name");
      name.append(el("code", node.node));
      if (node.here) name.append(el("br"), el("span", "this node", "badge"));
      const beat = node.heartbeat === null ? "–" : `${Math.max(0, Math.round(now - node.heartbeat))} s ago`;
      row.append(name, el("td", String(node.users)), el("td", String(node.connections)), el("td", beat));
      return row;
    });
    $("node-list").replaceChildren(...rows);
  }

  function addRecipient(id) {
    const ids = splitIds($("user-ids").value);
    if (!ids.includes(id)) ids.push(id);
    $("user-ids").value = ids.join(", ");
    $("to-some").checked = true;
    showRecipients();
    $("user-ids").focus();
  }

  // The user ids only count for "Chosen users"; with "Everyone" they are greyed out (and kept for later).
  function showRecipients() {
    $("user-ids-field").classList.toggle("unused", !$("to-some").checked);
  }

  function splitIds(text) {
    return text.split(/[\s,]+/).filter((part) => part.length > 0);
  }

  // --- send ---------------------------------------------------------------------------------------------

  function buildBody() {
    const message = $("message").value;
    if (!message.trim()) throw new Error("Write a message first.");
    const body = { message };
    if ($("to-some").checked) {
      const ids = splitIds($("user-ids").value);
      if (ids.length === 0) throw new Error("Enter at least one user id, or choose Everyone.");
      const bad = ids.find((id) => !isUserId(id));
      if (bad !== undefined) throw new Error(`"${bad}" is not a valid user id (A-Z a-z 0-9 _ . : @ -, up to 128).`);
      body.user_ids = ids;
    }
    const type = $("type").value.trim();
    if (type) body.type = type;
    const data = $("data").value.trim();
    if (data) {
      try {
        body.data = JSON.parse(data);
      } catch (error) {
        throw new Error(`Data is not valid JSON: ${error.message}`);
      }
    }
    return body;
  }

  async function send(event) {
    event.preventDefault();
    const result = $("send-result");
    let body;
    try {
      body = buildBody();
    } catch (error) {
      show(result, error.message, "error");
      return;
    }
    const button = $("send-button");
    button.disabled = true;
    show(result, "Sending…");
    try {
      const response = await fetch("notification", {
        method: "POST",
        headers: apiHeaders({ "Content-Type": "application/json" }),
        body: JSON.stringify(body),
      });
      if (!response.ok) throw new Error(await problem(response));
      const answer = await response.json();
      const lost = answer.disconnected_users ? `, ${answer.disconnected_users} dropped` : "";
      show(result, `${answer.message}: ${answer.sent_count} of ${answer.total_connections} connections` +
        `${lost} (id ${answer.id})`, "ok");
    } catch (error) {
      show(result, `Not sent: ${error.message}`, "error");
    } finally {
      button.disabled = false;
    }
  }

  // --- live feed: a WebSocket that resumes with ?since= ---------------------------------------------------

  const feed = { user: null, token: "", socket: null, lastId: null, attempts: 0, retry: null, dead: null };

  function listenUrl() {
    // Relative to this page (…/api/v1/ws/console), so …/api/v1/ws/<user> under any prefix.
    const url = new URL(encodeURIComponent(feed.user), window.location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.search = "";
    url.hash = "";
    url.searchParams.set("heartbeat", String(HEARTBEAT_S));
    if (feed.token) url.searchParams.set("token", feed.token); // a browser WebSocket cannot send headers
    if (feed.lastId) url.searchParams.set("since", feed.lastId);
    return url.href;
  }

  function setFeedState(text, kind) {
    show($("feed-state"), text, kind);
  }

  function startListening(event) {
    event.preventDefault();
    const user = $("listen-user").value.trim();
    if (!isUserId(user)) {
      setFeedState(`"${user}" is not a valid user id (A-Z a-z 0-9 _ . : @ -, up to 128).`, "error");
      return;
    }
    stopListening();
    if (user !== feed.user) {
      feed.lastId = null; // another user's ids say nothing about this one's history
      $("last-id").textContent = "none";
      $("feed-list").replaceChildren();
    }
    feed.user = user;
    feed.token = $("listen-token").value.trim();
    $("stop-button").disabled = false;
    connect();
  }

  function stopListening() {
    clearTimeout(feed.retry);
    clearTimeout(feed.dead);
    if (feed.socket) {
      const socket = feed.socket;
      feed.socket = null;
      socket.close(1000, "stopped");
    }
    $("stop-button").disabled = true;
    setFeedState(feed.user ? `Stopped listening as ${feed.user}.` : "Not listening.");
  }

  function connect() {
    const socket = new WebSocket(listenUrl());
    feed.socket = socket;
    setFeedState(feed.lastId ? `Reconnecting as ${feed.user}, resuming after ${feed.lastId}…` :
      `Connecting as ${feed.user}…`);
    socket.onopen = () => {
      feed.attempts = 0;
      setFeedState(`Listening as ${feed.user}.`, "ok");
      watchLine();
    };
    socket.onmessage = (message) => {
      watchLine();
      receive(message.data);
    };
    socket.onclose = (closed) => {
      if (feed.socket !== socket) return; // stopped on purpose, or replaced
      clearTimeout(feed.dead);
      feed.socket = null;
      feed.attempts += 1;
      const hinted = /after (\d+) ms/.exec(closed.reason || ""); // 1012 says when to come back
      const backoff = Math.min(30000, 1000 * 2 ** Math.min(feed.attempts - 1, 5)) * (0.5 + Math.random() / 2);
      const delay = hinted ? Number(hinted[1]) : backoff;
      // A refused handshake (401, 403, 429...) reaches a browser only as 1006, without the server's reason.
      const why = closed.code === 1006 ? "the connection failed or was refused: check the user id and token" :
        `code ${closed.code}${closed.reason ? `: ${closed.reason}` : ""}`;
      setFeedState(`Disconnected (${why}). Reconnecting in ${(delay / 1000).toFixed(1)} s…`, "error");
      feed.retry = setTimeout(connect, delay);
    };
  }

  // A line that has sent nothing, not even a heartbeat, for 2.5 intervals is dead: drop it and reconnect.
  function watchLine() {
    clearTimeout(feed.dead);
    const socket = feed.socket;
    feed.dead = setTimeout(() => {
      if (socket && socket === feed.socket) socket.close(4000, "no heartbeat");
    }, HEARTBEAT_S * 2500);
  }

  function receive(raw) {
    let frame;
    try {
      frame = JSON.parse(raw);
    } catch (_) {
      addEntry({ type: "unreadable", message: String(raw) });
      return;
    }
    if (frame.type === "heartbeat") {
      setFeedState(`Listening as ${feed.user}. Line alive at ${new Date().toLocaleTimeString()}.`, "ok");
      return;
    }
    if (frame.type === "resume") {
      addNote(frame.recovered ?
        `Resumed: ${frame.replayed} missed notification(s) replayed.` :
        `Resumed, but some notifications may be missing (older than the server keeps); ${frame.replayed} replayed.`);
      return;
    }
    if (typeof frame.id === "string") {
      feed.lastId = frame.id;
      $("last-id").textContent = frame.id;
    }
    addEntry(frame);
  }

  function addEntry(frame) {
    const item = el("li", undefined, "entry");
    const head = el("div", undefined, "entry-head");
    head.append(el("span", String(frame.type ?? "message"), "badge"));
    head.append(el("time", frame.sent_at ? new Date(frame.sent_at).toLocaleTimeString() :
      new Date().toLocaleTimeString()));
    if (frame.id) head.append(el("code", String(frame.id), "muted"));
    item.append(head);
    item.append(el("p", String(frame.message ?? ""), "entry-message"));
    if (frame.data !== undefined) item.append(el("pre", JSON.stringify(frame.data, null, 2), "entry-data"));
    prepend(item);
  }

  function addNote(text) {
    prepend(el("li", text, "note"));
  }

  function prepend(item) {
    const list = $("feed-list");
    list.prepend(item);
    while (list.children.length > FEED_MAX) list.lastElementChild.remove();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("send-form").addEventListener("submit", send);
    $("listen-form").addEventListener("submit", startListening);
    $("stop-button").addEventListener("click", stopListening);
    $("user-ids").addEventListener("input", () => {
      if ($("user-ids").value.trim()) $("to-some").checked = true;
      showRecipients();
    });
    for (const radio of document.querySelectorAll('input[name="to"]')) radio.addEventListener("change", showRecipients);
    showRecipients();
    poll();
  });
})();
