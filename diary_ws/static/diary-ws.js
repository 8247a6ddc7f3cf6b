// diary-ws browser client: one dependency-free ES module, served by the server at /api/v1/ws/client.js.
//
//   import { DiaryWebSocketClient } from "https://notify.example.com/api/v1/ws/client.js";
//   const client = new DiaryWebSocketClient("123456789");
//   client.onNotification((message) => console.log(message.message));
//   await client.connect();
//
// It keeps the shape of the integration guide's class (connect, disconnect, onMessage, onNotification,
// isConnected) and adds what a page needs to lose nothing: reconnects with jittered backoff that follow the
// server's close codes, `?since=<last id>` resume, the `resume` frame as events, a heartbeat watchdog, and an
// EventSource fallback when no WebSocket can be opened. Every message is delivered once: ids at or below the
// last one delivered are dropped, across reconnects and the fallback. docs/browser-client.md has the details.

const LISTEN = "/api/v1/ws/";
const STREAM = "/api/v1/sse/";
const SELF = "/api/v1/ws/client.js";
const CLOSE_TOKEN_EXPIRED = 4001;
const CLOSE_OPERATOR = 4003;
const CLOSE_SLOW_CONSUMER = 4008;
const CLOSE_RESTARTING = 1012;
const MAX_HINT_MS = 60000; // a 1012 hint is honoured above the backoff's cap, but not without bound
const TOKEN_MARGIN_MS = 5000; // a token this close to its `exp` is fetched anew before a handshake

const DEFAULTS = Object.freeze({
  token: null,
  since: null,
  heartbeat: 30,
  fallback: true,
  backoff: Object.freeze({ base: 500, cap: 30000 }),
  healthyAfter: 5000,
  openTimeout: 10000,
  shortDelay: 1000,
  logger: null,
});

/** The library's own base URL: where it was served from, minus /api/v1/ws/client.js. */
function defaultBase() {
  const here = new URL(import.meta.url);
  if (!here.pathname.endsWith(SELF)) {
    throw new TypeError(
      `DiaryWebSocketClient: this module was not loaded from a diary-ws server (${here.href}); ` +
        "pass the server's base URL, such as https://notify.example.com, as the second argument",
    );
  }
  return here.origin + here.pathname.slice(0, -SELF.length);
}

/** `http(s)://` or `ws(s)://host[/prefix]`, absolute or relative to the page -> {ws, http} bases, no slash. */
function bases(baseUrl) {
  const url = new URL(baseUrl, globalThis.location?.href);
  const secure = url.protocol === "https:" || url.protocol === "wss:";
  if (!["http:", "https:", "ws:", "wss:"].includes(url.protocol)) {
    throw new TypeError(`DiaryWebSocketClient: baseUrl must be http(s):// or ws(s)://, not ${baseUrl}`);
  }
  const rest = url.host + url.pathname.replace(/\/+$/, "");
  return { ws: (secure ? "wss://" : "ws://") + rest, http: (secure ? "https://" : "http://") + rest };
}

/** "<ms>-<seq>" -> [ms, seq], or null. Ids compare as that pair of integers, never as strings. */
function parseId(text) {
  const found = typeof text === "string" ? /^(\d{1,15})-(\d{1,15})$/.exec(text) : null;
  return found ? [Number(found[1]), Number(found[2])] : null;
}

function after(a, b) {
  return a[0] > b[0] || (a[0] === b[0] && a[1] > b[1]);
}

/** The `exp` of a JWT in milliseconds, or null when the token is not a JWT with one. */
function expiry(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
    return typeof claims.exp === "number" ? claims.exp * 1000 : null;
  } catch {
    return null;
  }
}

/** The delay a 1012 close reason asks for ("... reconnect with since after 1234 ms"), or null. */
function hintedDelay(reason) {
  const found = /after (\d{1,7}) ?ms/.exec(reason || "");
  return found ? Math.min(Number(found[1]), MAX_HINT_MS) : null;
}

function report(error) {
  // A handler's exception must not break the client; it still reaches the page's error reporting.
  if (typeof globalThis.reportError === "function") globalThis.reportError(error);
  else setTimeout(() => { throw error; });
}

export class DiaryWebSocketClient extends EventTarget {
  /**
   * @param {string} userId
   * @param {string} [baseUrl] the server, e.g. "https://notify.example.com" or "ws://localhost:8000/notify";
   *   by default the server this module was imported from.
   * @param {object} [options] see diary-ws.d.ts and docs/browser-client.md
   */
  constructor(userId, baseUrl, options = {}) {
    super();
    if (typeof userId !== "string" || !/^[A-Za-z0-9_.:@-]{1,128}$/.test(userId) || userId === "." || userId === "..") {
      throw new TypeError(`DiaryWebSocketClient: ${JSON.stringify(userId)} is not a valid user id`);
    }
    this.userId = userId;
    this.baseUrl = baseUrl ?? defaultBase();
    const given = Object.fromEntries(Object.entries(options).filter(([, value]) => value !== undefined));
    this.options = { ...DEFAULTS, ...given, backoff: { ...DEFAULTS.backoff, ...(given.backoff || {}) } };
    this._bases = bases(this.baseUrl);
    const beat = this.options.heartbeat;
    if (beat !== 0 && beat !== null && !(Number.isInteger(beat) && beat >= 1 && beat <= 300)) {
      throw new TypeError("DiaryWebSocketClient: heartbeat must be a whole number of seconds from 1 to 300, or 0");
    }
    this.messageHandlers = new Map();
    this.isConnected = false;
    this.transport = null; // "websocket" or "sse" while connected
    this.state = "idle"; // idle, connecting, open, waiting, stopped
    this.recovered = null; // what the latest resume frame said
    this.connections = 0; // transports opened so far; more than one means it has reconnected
    this.duplicates = 0; // messages dropped because their id was at or below one already delivered
    this._last = this.options.since == null ? null : parseId(this.options.since);
    if (this.options.since != null && this._last === null) {
      throw new TypeError(`DiaryWebSocketClient: since ${JSON.stringify(this.options.since)} is not a message id`);
    }
    this._lastText = this._last ? this.options.since : null;
    this._origin = null; // where to resume before any id has been seen: when the first connection opened
    this._token = typeof this.options.token === "string" ? this.options.token : null;
    this._tokenStale = false;
    this._attempt = 0;
    this._ws = null;
    this._es = null;
    this._timers = new Set();
    this._watchdog = null;
    this._generation = 0; // bumped on every teardown, so callbacks of an old transport do nothing
    this._waiters = [];
    this._online = () => this._wakeUp();
  }

  /** The open WebSocket, as the guide's `ws` field (null on the fallback stream and between connections). */
  get ws() {
    return this.transport === "websocket" ? this._ws : null;
  }

  /** The id of the last message delivered (or the `since` given): where a reconnect resumes. */
  get lastId() {
    return this._lastText;
  }

  // --- the guide's shape -------------------------------------------------------------------------------

  /** Connect; resolves once a WebSocket (or the EventSource fallback) is open, rejects if the client stops first. */
  connect() {
    if (this.state === "open") return Promise.resolve();
    const opened = new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
    if (this.state === "idle" || this.state === "stopped") {
      this.state = "connecting";
      globalThis.addEventListener?.("online", this._online);
      this._open();
    }
    return opened;
  }

  /** Close for good (reconnects stop); `connect()` may be called again later and resumes from `lastId`. */
  disconnect() {
    this._stop(1000, "disconnect() called", false);
  }

  /** One handler per message type, as in the guide; a later call for the same type replaces it. */
  onMessage(type, handler) {
    this.messageHandlers.set(type, handler);
  }

  onNotification(handler) {
    this.onMessage("notification", handler);
  }

  /** `handler(recovered, replayed)` after every resume (each reconnect that asked for `since`). */
  onResume(handler) {
    this.addEventListener("resume", (event) => handler(event.detail.recovered, event.detail.replayed));
  }

  handleMessage(message) {
    this._emit("message", message);
    const handler = this.messageHandlers.get(message.type);
    if (handler) {
      try {
        handler(message);
      } catch (error) {
        report(error);
      }
    } else {
      this.options.logger?.debug?.("diary-ws: no handler for", message.type, message);
    }
  }

  // --- transports ----------------------------------------------------------------------------------------

  async _open() {
    const generation = ++this._generation;
    let token;
    try {
      token = await this._freshToken();
    } catch (error) {
      this._log("warn", "could not get a token", error);
      if (generation === this._generation) this._retry(null);
      return;
    }
    if (generation !== this._generation || this.state === "stopped") return;
    const exp = typeof token === "string" && typeof this.options.token === "string" ? expiry(token) : null;
    if (exp !== null && exp <= Date.now()) {
      this._stop(CLOSE_TOKEN_EXPIRED, "the token has expired: pass a function that fetches a fresh one", false);
      return;
    }
    // Every connection tries a WebSocket first, even after the fallback worked: a server that was down
    // looks like one whose WebSockets are blocked, and a page should not stay on the stream for that.
    this._openSocket(token, generation);
  }

  _query(token, heartbeat) {
    const query = new URLSearchParams();
    const since = this._lastText ?? this._origin;
    this._askedSince = since; // the resume frame answers for this one, whatever the replay moves on to
    if (since) query.set("since", since);
    if (heartbeat) query.set("heartbeat", String(heartbeat));
    if (token) query.set("token", token); // a browser cannot set headers on a WebSocket or an EventSource
    const text = query.toString();
    return text ? `?${text}` : "";
  }

  _openSocket(token, generation) {
    const heartbeat = this.options.heartbeat || 0;
    const url = `${this._bases.ws}${LISTEN}${encodeURIComponent(this.userId)}${this._query(token, heartbeat)}`;
    let ws;
    try {
      ws = new WebSocket(url);
    } catch (error) {
      this._log("warn", "cannot create a WebSocket", error);
      this._cannotOpenSocket(token, generation);
      return;
    }
    this._ws = ws;
    let opened = false;
    const timeout = this._after(this.options.openTimeout, () => {
      ws.close();
      this._cannotOpenSocket(token, generation);
    });
    ws.onopen = () => {
      if (generation !== this._generation) return;
      opened = true;
      this._clear(timeout);
      this._opened("websocket", heartbeat);
    };
    ws.onmessage = (event) => {
      if (generation !== this._generation) return;
      this._feedWatchdog(heartbeat);
      this._frame(event.data);
    };
    ws.onclose = (event) => {
      if (generation !== this._generation) return;
      this._clear(timeout);
      if (opened) this._closed(event.code, event.reason);
      else this._cannotOpenSocket(token, generation);
    };
    ws.onerror = () => {}; // onclose follows with what is known; the browser logs the error itself
  }

  _cannotOpenSocket(token, generation) {
    if (generation !== this._generation) return;
    this._detach();
    // A refusal (401, 403, 429) and a proxy that does not pass WebSockets look the same to a page: no
    // status, a 1006. The token may be the reason, so it is fetched anew next time; the stream may work.
    this._tokenStale = true;
    if (this.options.fallback && typeof EventSource === "function") this._openStream(token, ++this._generation);
    else this._retry(null);
  }

  _openStream(token, generation) {
    const url = `${this._bases.http}${STREAM}${encodeURIComponent(this.userId)}${this._query(token, 0)}`;
    const es = new EventSource(url);
    this._es = es;
    let opened = false;
    const failed = () => {
      if (generation !== this._generation) return;
      es.close();
      this._detach();
      this._tokenStale = true;
      this._retry(null);
    };
    const timeout = this._after(this.options.openTimeout, failed); // EventSource itself waits for ever
    es.onopen = () => {
      if (generation !== this._generation) return;
      opened = true;
      this._clear(timeout);
      this._opened("sse", 0);
    };
    es.onmessage = (event) => {
      if (generation === this._generation) this._frame(event.data);
    };
    es.onerror = () => {
      if (generation !== this._generation) return;
      // EventSource would retry by itself, but with its own timing and the old URL (token, since):
      // the client's backoff takes over. SSE carries no close code; the server ends a stream with a comment.
      this._clear(timeout);
      if (!opened) {
        failed();
        return;
      }
      this._closed(null, "the event stream ended"); // it closes `es`
    };
  }

  _opened(transport, heartbeat) {
    this.isConnected = true;
    this.transport = transport;
    this.state = "open";
    this.connections += 1;
    this._openedAt = Date.now();
    // Until a first id arrives, a reconnect resumes from when this connection opened (ids are the
    // server's wall-clock milliseconds, so only clock skew between browser and server blurs it).
    this._origin = this._origin ?? `${Date.now() - 1000}-0`;
    this._feedWatchdog(heartbeat);
    this._log("info", `connected by ${transport}`);
    this._emit("open", { transport, connections: this.connections });
    for (const waiter of this._waiters.splice(0)) waiter.resolve();
  }

  _frame(data) {
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      this._log("warn", "ignored a frame that is not JSON", data);
      return;
    }
    if (message === null || typeof message !== "object" || Array.isArray(message)) return;
    if (message.type === "heartbeat") return;
    if (message.type === "resume") {
      this._resumed(message.recovered === true, Number(message.replayed) || 0);
      return;
    }
    const id = parseId(message.id);
    if (id) {
      if (this._last && !after(id, this._last)) {
        this.duplicates += 1;
        return;
      }
      this._last = id;
      this._lastText = message.id;
    }
    this.handleMessage(message);
  }

  _resumed(recovered, replayed) {
    this.recovered = recovered;
    const detail = { recovered, replayed, since: this._askedSince };
    this._emit("resume", detail);
    if (!recovered) {
      this._log("warn", "the server no longer holds everything since", detail.since, "; some messages were missed");
      this._emit("missed", detail);
    }
  }

  // --- losing a connection, and coming back -------------------------------------------------------------

  _closed(code, reason) {
    const transport = this.transport;
    this._detach();
    if (Date.now() - this._openedAt >= this.options.healthyAfter) this._attempt = 0;
    this._emit("close", { code, reason, transport });
    if (code === CLOSE_OPERATOR) {
      this._stop(code, reason, true);
      return;
    }
    if (code === CLOSE_TOKEN_EXPIRED) {
      if (typeof this.options.token !== "function") {
        this._stop(code, reason, true); // the same token would be refused: only a token function can help
        return;
      }
      this._tokenStale = true;
    }
    let delay = null;
    if (code === CLOSE_RESTARTING) delay = hintedDelay(reason) ?? this._short(5000);
    else if (code === CLOSE_TOKEN_EXPIRED || code === CLOSE_SLOW_CONSUMER) delay = this._short(this.options.shortDelay);
    this._retry(delay, code, reason);
  }

  _retry(delay, code = null, reason = "") {
    if (this.state === "stopped") return;
    if (delay === null) {
      const { base, cap } = this.options.backoff;
      delay = Math.random() * Math.min(cap, base * 2 ** Math.min(this._attempt, 30)); // full jitter
      this._attempt += 1;
    }
    this.state = "waiting";
    this._log("info", `reconnecting in ${Math.round(delay)} ms`, code ?? "", reason || "");
    this._emit("reconnecting", { delay, code, reason, since: this._lastText ?? this._origin });
    this._pending = this._after(delay, () => {
      this._pending = null;
      this.state = "connecting";
      this._open();
    });
  }

  _wakeUp() {
    // The browser says the network is back: do not sit out the rest of a long backoff.
    if (this.state === "waiting" && this._pending) {
      this._clear(this._pending);
      this._pending = null;
      this.state = "connecting";
      this._open();
    }
  }

  _short(most) {
    return most / 4 + (Math.random() * most * 3) / 4; // jittered, so dropped clients do not return at once
  }

  _feedWatchdog(heartbeat) {
    this._clear(this._watchdog);
    this._watchdog = null;
    if (!heartbeat) return;
    // Two heartbeats missed and a second more: the line is dead even if TCP has not noticed yet.
    this._watchdog = this._after(heartbeat * 2000 + 1000, () => {
      this._watchdog = null;
      this._log("warn", `no frame for ${heartbeat * 2 + 1} s: reconnecting`);
      this._ws?.close(4000, "heartbeat missed");
      this._closed(null, "heartbeat missed");
    });
  }

  async _freshToken() {
    const source = this.options.token;
    if (typeof source !== "function") return source;
    const exp = this._token ? expiry(this._token) : null;
    if (this._token && !this._tokenStale && (exp === null || exp - Date.now() > TOKEN_MARGIN_MS)) return this._token;
    const token = await source();
    if (typeof token !== "string" || !token) throw new TypeError("the token function must return a non-empty string");
    this._token = token;
    this._tokenStale = false;
    return token;
  }

  _detach() {
    this._generation += 1;
    this._clear(this._watchdog);
    this._watchdog = null;
    const ws = this._ws;
    const es = this._es;
    this._ws = null;
    this._es = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      if (ws.readyState === WebSocket.CONNECTING || ws.readyState === WebSocket.OPEN) ws.close(1000);
    }
    if (es) es.close();
    this.isConnected = false;
    this.transport = null;
  }

  _stop(code, reason, byServer) {
    const wasOpen = this.transport;
    this._detach();
    for (const timer of this._timers) clearTimeout(timer);
    this._timers.clear();
    this._pending = null;
    globalThis.removeEventListener?.("online", this._online);
    if (this.state === "stopped" || this.state === "idle") return;
    this.state = "stopped";
    if (byServer) this._log("warn", `stopped: the server closed with ${code}: ${reason}`);
    if (wasOpen) this._emit("close", { code, reason, transport: wasOpen });
    this._emit("stopped", { code, reason, byServer });
    const error = new Error(`diary-ws: stopped (${code}${reason ? `: ${reason}` : ""})`);
    Object.assign(error, { code, reason });
    for (const waiter of this._waiters.splice(0)) waiter.reject(error);
  }

  // --- small helpers --------------------------------------------------------------------------------------

  _after(ms, callback) {
    const timer = setTimeout(() => {
      this._timers.delete(timer);
      callback();
    }, ms);
    this._timers.add(timer);
    return timer;
  }

  _clear(timer) {
    if (timer != null) {
      clearTimeout(timer);
      this._timers.delete(timer);
    }
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _log(level, ...args) {
    this.options.logger?.[level]?.("diary-ws:", ...args);
  }
}

export default DiaryWebSocketClient;
