// Warren WebSocket client (protocol `warren.v1`), for browsers and Node >= 20.
// Dependency-free ES module: `import { Warren } from "./warren.js"`.
// It does what every application gets wrong by hand: reconnect with backoff and
// jitter, resubscribe, token refresh before `exp` (and a fresh token after 4401),
// durable resume with safe acks, stream offsets, confirm tracking and idempotent
// publish retries. The protocol: SPEC.md §6 (and §9-§11), openapi/asyncapi.yaml.

export const VERSION = "0.1.0";

/** Close codes Warren uses (SPEC §6). */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  SHUTDOWN: 1001,
  POLICY: 1008,
  TOO_LARGE: 1009,
  TOKEN_EXPIRED: 4401,
  SLOW_CONSUMER: 4408,
});

/** An error answered by Warren (`code` as in SPEC §4) or raised by the client. */
export class WarrenError extends Error {
  constructor(code, detail, extra = {}) {
    super(`${code}: ${detail}`);
    this.name = "WarrenError";
    this.code = code;
    this.detail = detail;
    Object.assign(this, extra);
  }
}

const DEFAULTS = {
  reconnect: { initialDelayMs: 500, maxDelayMs: 30000, factor: 2, jitter: 0.5 },
  refreshMarginMs: 30000,
  probe: true,
  autoConnect: true,
};

const TRANSIENT = new Set(["broker_unavailable", "broker_rejected", "confirm_timeout", "rate_limited"]);

/** Tiny event emitter; `on()` returns a function that removes the listener. */
class Emitter {
  #listeners = new Map();
  on(event, fn) {
    if (!this.#listeners.has(event)) this.#listeners.set(event, new Set());
    this.#listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }
  once(event, fn) {
    const off = this.on(event, (...args) => { off(); fn(...args); });
    return off;
  }
  off(event, fn) { this.#listeners.get(event)?.delete(fn); }
  emit(event, ...args) {
    for (const fn of [...(this.#listeners.get(event) ?? [])]) {
      try { fn(...args); } catch (e) { queueMicrotask(() => { throw e; }); }
    }
  }
}

/** `exp` (seconds) of a JWT, or undefined; the signature is not checked (Warren does). */
export function tokenExpiry(token) {
  try {
    const part = String(token).split(".")[1];
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((part.length + 3) % 4);
    const json = typeof atob === "function" ? atob(b64) : Buffer.from(b64, "base64").toString("binary");
    const exp = JSON.parse(json).exp;
    return typeof exp === "number" ? exp : undefined;
  } catch {
    return undefined;
  }
}

function toBase64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function fromBase64(text) {
  const s = atob(text);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

const snake = (key) => key.replace(/[A-Z]/g, (c) => "_" + c.toLowerCase());

function snakeKeys(object) {
  if (!object) return object;
  const out = {};
  for (const [k, v] of Object.entries(object)) out[k === "headers" ? k : snake(k)] = v;
  return out;
}

const camel = (key) => key.replace(/_([a-z])/g, (_, c) => c.toUpperCase());

function camelKeys(object) {
  if (!object) return {};
  const out = {};
  for (const [k, v] of Object.entries(object)) out[k === "headers" ? k : camel(k)] = v;
  return out;
}

/** The body of a publish/request frame from the client's camelCase message. */
function publishBody(m) {
  if (!m || typeof m !== "object") throw new TypeError("publish: a message object is required");
  if (typeof m.exchange !== "string") throw new TypeError("publish: `exchange` is required");
  if (typeof m.routingKey !== "string") throw new TypeError("publish: `routingKey` is required");
  const body = { exchange: m.exchange, routing_key: m.routingKey };
  if (m.payload !== undefined) body.payload = m.payload;
  else if (m.bodyBase64 !== undefined) body.body_base64 = m.bodyBase64;
  else if (m.body instanceof Uint8Array) body.body_base64 = toBase64(m.body);
  else if (m.body instanceof ArrayBuffer) body.body_base64 = toBase64(new Uint8Array(m.body));
  else if (m.body !== undefined) body.body = String(m.body);
  else throw new TypeError("publish: one of `payload`, `body` or `bodyBase64` is required");
  if (m.contentType !== undefined) body.content_type = m.contentType;
  if (m.properties !== undefined) body.properties = snakeKeys(m.properties);
  if (m.mandatory !== undefined) body.mandatory = m.mandatory;
  if (m.timeoutMs !== undefined) body.timeout_ms = m.timeoutMs;
  return body;
}

function randomKey() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}-${Math.random().toString(36).slice(2)}`;
}

/** One message delivered to a subscription handler. */
class Message {
  #settle;
  #settled = false;
  constructor(frame, settle) {
    this.subscription = frame.subscription;
    this.exchange = frame.exchange;
    this.routingKey = frame.routing_key;
    this.redelivered = frame.redelivered === true;
    this.deliveryTag = frame.delivery_tag;
    this.offset = frame.offset;
    this.properties = camelKeys(frame.properties);
    this.payload = frame.payload;
    this.bodyBase64 = frame.body_base64;
    /** `format: "cloudevents"`: the message as a structured CloudEvent. */
    this.event = frame.event;
    this.frame = frame;
    this.#settle = settle;
  }
  /** The raw body: the JSON text for `payload`, the decoded bytes for `body_base64`. */
  get body() {
    if (this.bodyBase64 !== undefined) return fromBase64(this.bodyBase64);
    return new TextEncoder().encode(JSON.stringify(this.payload));
  }
  /** The body as text (UTF-8). */
  text() {
    if (this.bodyBase64 !== undefined) return new TextDecoder().decode(fromBase64(this.bodyBase64));
    return JSON.stringify(this.payload);
  }
  get settled() { return this.#settled; }
  /** Acknowledge (durable/queue). Returns false when it could not be sent: the socket it
   * came on is gone, so the broker redelivers it (at-least-once); never acks another message. */
  ack() { return this.#done("ack", {}); }
  /** Negative acknowledge; `requeue` (default true) puts it back, false dead-letters or drops. */
  nack({ requeue = true } = {}) { return this.#done("nack", { requeue }); }
  #done(kind, extra) {
    if (this.#settled) return false;
    this.#settled = true;
    return this.#settle ? this.#settle(kind, extra) : false;
  }
}

/** A subscription; survives reconnects until `unsubscribe()`. */
class Subscription extends Emitter {
  constructor(client, id, spec, handler) {
    super();
    this.client = client;
    this.id = id;
    this.spec = spec;
    this.handler = handler;
    this.mode = spec.mode ?? "live";
    this.state = "pending"; // pending | subscribing | subscribed | failed | closed
    this.queue = undefined;
    this.lastOffset = undefined;
    this.incarnation = 0; // bumped on every `subscribed`: acks of older deliveries are dropped
    this.attempts = 0;
    this.retryTimer = undefined;
    this.unsubscribing = 0;
    this.chain = Promise.resolve();
    this.ready = new Promise((resolve, reject) => { this._resolve = resolve; this._reject = reject; });
    this.ready.catch(() => {});
  }

  /** The subscribe frame; a stream resumes after the last offset it delivered. */
  frame() {
    const s = this.spec;
    const f = { type: "subscribe", id: this.id, mode: this.mode };
    if (s.exchange !== undefined) f.exchange = s.exchange;
    if (s.bindingKey !== undefined) f.binding_key = s.bindingKey;
    if (s.queue !== undefined) f.queue = s.queue;
    if (s.prefetch !== undefined) f.prefetch = s.prefetch;
    if (s.format !== undefined) f.format = s.format;
    if (this.mode === "stream") {
      if (s.stream !== undefined) f.stream = s.stream;
      if (this.lastOffset !== undefined) f.offset = this.lastOffset + 1;
      else if (s.offset !== undefined) f.offset = s.offset;
    }
    return f;
  }

  /** Stops the subscription (and its resubscription after reconnects). */
  async unsubscribe() {
    return this.client._unsubscribe(this);
  }
}

/**
 * A Warren WebSocket client. `url`: `ws(s)://host/v1/ws`, or an `http(s)://host` base
 * (the path `/v1/ws` is added when the URL has none).
 */
export class Warren extends Emitter {
  #ws = null;
  #generation = 0;
  #nextId = 1;
  #subs = new Map();
  #pending = new Map(); // publish/request id -> entry
  #attempt = 0;
  #reconnectTimer;
  #refreshTimer;
  #token;
  #closedByUser = false;
  #lastSentPublish;

  constructor(url, options = {}) {
    super();
    this.url = Warren.socketUrl(url);
    this.options = {
      ...DEFAULTS,
      ...options,
      reconnect: options.reconnect === false ? false : { ...DEFAULTS.reconnect, ...(options.reconnect ?? {}) },
    };
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.WebSocket !== "function") {
      throw new TypeError("no WebSocket implementation: pass { WebSocket } (e.g. from the `ws` package), " +
        "or use Node >= 22 (Node 20/21: run with --experimental-websocket)");
    }
    this.state = "idle"; // idle | connecting | connected | disconnected | closed
    this.closeCode = undefined;
    this.closeReason = undefined;
    if (this.options.autoConnect) queueMicrotask(() => { if (this.state === "idle") this.connect(); });
  }

  /** `http://h` -> `ws://h/v1/ws`; a URL with a path is kept as it is. */
  static socketUrl(url) {
    const u = new URL(String(url), globalThis.location?.href);
    if (u.protocol === "http:") u.protocol = "ws:";
    if (u.protocol === "https:") u.protocol = "wss:";
    if (u.pathname === "/" || u.pathname === "") u.pathname = "/v1/ws";
    return u.toString();
  }

  /** The HTTP URL of the same endpoint (for the failure probe). */
  get httpUrl() {
    const u = new URL(this.url);
    u.protocol = u.protocol === "wss:" ? "https:" : "http:";
    return u.toString();
  }

  // ---------------------------------------------------------------- connection

  /** Starts connecting (done by the constructor unless `autoConnect: false`). */
  connect() {
    if (this.state === "connecting" || this.state === "connected") return;
    this.#closedByUser = false;
    clearTimeout(this.#reconnectTimer);
    this.#open();
  }

  /** Closes for good: no reconnect; pending publishes and requests are rejected. */
  close(code = 1000, reason = "client closed") {
    this.#closedByUser = true;
    clearTimeout(this.#reconnectTimer);
    clearTimeout(this.#refreshTimer);
    for (const sub of this.#subs.values()) clearTimeout(sub.retryTimer);
    const ws = this.#ws;
    this.#ws = null;
    this.#generation++;
    if (ws) try { ws.close(code, reason); } catch { /* already closing */ }
    this.#final(code, reason, new WarrenError("closed", "the client was closed"));
  }

  /** Resolves once connected (rejects if the client is closed for good first). */
  ready() {
    if (this.state === "connected") return Promise.resolve();
    if (this.state === "closed") return Promise.reject(new WarrenError("closed", "the client is closed"));
    return new Promise((resolve, reject) => {
      const offs = [
        this.on("connected", () => { offs.forEach((f) => f()); resolve(); }),
        this.on("closed", (e) => {
          offs.forEach((f) => f());
          reject(e.error ?? new WarrenError("closed", `closed (${e.code})`, { closeCode: e.code }));
        }),
      ];
    });
  }

  #setState(state, detail = {}) {
    this.state = state;
    const event = { state, ...detail };
    this.emit(state, event);
    this.emit("state", event);
  }

  async #currentToken(fresh) {
    const t = this.options.token;
    if (typeof t === "function") {
      // A cached token about to expire is not worth a refused upgrade: fetch a new one.
      const exp = this.#token === undefined ? undefined : tokenExpiry(this.#token);
      const stale = exp !== undefined && exp * 1000 - Date.now() < 5000;
      if (fresh || stale || this.#token === undefined) this.#token = await t();
    } else {
      this.#token = t;
    }
    return this.#token;
  }

  async #open(freshToken = false) {
    const generation = ++this.#generation;
    this.#setState("connecting", { attempt: this.#attempt });
    let token;
    try {
      token = await this.#currentToken(freshToken);
    } catch (e) {
      if (generation !== this.#generation) return;
      this.emit("error", new WarrenError("token_error", `the token function failed: ${e?.message ?? e}`, { cause: e }));
      return this.#scheduleReconnect(undefined, "token function failed");
    }
    if (generation !== this.#generation) return;
    const protocols = ["warren.v1"];
    if (token) protocols.push("bearer." + token);
    let ws;
    try {
      ws = new this.WebSocket(this.url, protocols);
    } catch (e) {
      this.emit("error", new WarrenError("connect_failed", String(e?.message ?? e)));
      return this.#scheduleReconnect(undefined, "connect failed");
    }
    this.#ws = ws;
    let opened = false;
    let finished = false;
    ws.onopen = () => {
      if (generation !== this.#generation || finished) return;
      opened = true;
      this.#attempt = 0;
      this.closeCode = undefined;
      this.#setState("connected");
      this.#scheduleRefresh(token);
      for (const sub of this.#subs.values()) this.#sendSubscribe(sub);
      for (const entry of this.#pending.values()) if (!entry.sent) this.#sendEntry(entry);
    };
    ws.onmessage = (event) => {
      if (generation !== this.#generation) return;
      let data = event.data;
      if (typeof data !== "string") data = new TextDecoder().decode(data);
      let frame;
      try { frame = JSON.parse(data); } catch { return; }
      this.#onFrame(frame);
    };
    const finish = (code, reason) => {
      if (finished || generation !== this.#generation) return;
      finished = true;
      this.#ws = null;
      this.#onClose(code, reason, opened, token);
    };
    // Normally a close event follows an error; some implementations (Node 20's
    // experimental WebSocket on a refused connection) send none, so do not wait for it.
    ws.onerror = () => {
      if (finished) return;
      if (!opened) {
        finish(1006, "connection failed");
        try { ws.close(); } catch { /* not open */ }
        return;
      }
      setTimeout(() => {
        if (finished) return;
        try { ws.close(); } catch { /* ignore */ }
        finish(1006, "connection error");
      }, 1000);
    };
    ws.onclose = (event) => finish(event.code, event.reason ?? "");
  }

  #send(frame) {
    const ws = this.#ws;
    if (!ws || this.state !== "connected" || ws.readyState !== 1) return false;
    ws.send(JSON.stringify(frame));
    return true;
  }

  async #onClose(code, reason, opened, token) {
    clearTimeout(this.#refreshTimer);
    this.closeCode = code;
    this.closeReason = reason;
    for (const sub of this.#subs.values()) {
      clearTimeout(sub.retryTimer);
      if (sub.state === "subscribed" || sub.state === "subscribing") sub.state = "pending";
      sub.unsubscribing = 0;
    }
    // What was sent and not answered: an idempotent publish is sent again (same key);
    // anything else has an unknown outcome and is rejected.
    for (const [id, entry] of this.#pending) {
      if (!entry.sent) continue;
      if (code === CloseCode.TOO_LARGE && id === this.#lastSentPublish) {
        this.#pending.delete(id);
        entry.reject(new WarrenError("frame_too_large", "the frame is larger than Warren's ws.max_message_bytes (1009)"));
      } else if (entry.kind === "publish" && entry.body.idempotency_key !== undefined) {
        entry.sent = false;
      } else {
        this.#pending.delete(id);
        entry.reject(new WarrenError("connection_lost",
          "the connection closed before the answer; the outcome is unknown (use an idempotencyKey to retry safely)", { closeCode: code }));
      }
    }
    if (this.#closedByUser) return;
    // A failed upgrade hides the HTTP status from WebSocket APIs; ask with plain HTTP.
    let status;
    if (!opened && this.options.probe && typeof fetch === "function") status = await this.#probe(token);
    if (this.#closedByUser) return;
    const fatal = code === CloseCode.POLICY || status === 403 ||
      (status === 401 && typeof this.options.token !== "function");
    if (fatal || this.options.reconnect === false) {
      const why = status ? `HTTP ${status}` : `close ${code}`;
      return this.#final(code, reason, new WarrenError(status === 403 ? "forbidden" : status === 401 ? "unauthorized" : "closed",
        `the connection ended for good (${why}${reason ? ": " + reason : ""})`, { closeCode: code, status }), status);
    }
    // A token that expired (4401) or was refused (401): fetch a fresh one, then reconnect.
    const fresh = code === CloseCode.TOKEN_EXPIRED || status === 401;
    const immediate = code === CloseCode.TOKEN_EXPIRED && this.#attempt === 0;
    this.#scheduleReconnect(code, reason, { fresh, immediate, status });
  }

  /** `GET` the endpoint without an upgrade: 401/403 as REST answers them, else 400. */
  async #probe(token) {
    try {
      const headers = token ? { authorization: `Bearer ${token}` } : {};
      const controller = new AbortController();
      const timer = setTimeout(() => controller.abort(), 5000);
      const response = await fetch(this.httpUrl, { headers, signal: controller.signal });
      clearTimeout(timer);
      await response.body?.cancel?.();
      return response.status;
    } catch {
      return undefined;
    }
  }

  #scheduleReconnect(code, reason, { fresh = false, immediate = false, status } = {}) {
    if (this.#closedByUser) return;
    const delayMs = immediate ? 0 : this.backoff(this.#attempt);
    this.#attempt++;
    this.#setState("disconnected", { code, reason, status, willReconnect: true, delayMs });
    clearTimeout(this.#reconnectTimer);
    this.#reconnectTimer = setTimeout(() => {
      if (!this.#closedByUser) this.#open(fresh);
    }, delayMs);
  }

  /** The delay before reconnect attempt `n` (0-based): exponential, capped, with jitter. */
  backoff(n) {
    const r = this.options.reconnect || DEFAULTS.reconnect;
    const base = Math.min(r.maxDelayMs, r.initialDelayMs * r.factor ** n);
    return Math.round(base * (1 - r.jitter * Math.random()));
  }

  #final(code, reason, error, status) {
    clearTimeout(this.#refreshTimer);
    for (const [id, entry] of this.#pending) { this.#pending.delete(id); entry.reject(error); }
    for (const sub of this.#subs.values()) {
      clearTimeout(sub.retryTimer);
      if (sub.state !== "closed") { sub.state = "closed"; sub._reject(error); }
    }
    this.#subs.clear();
    if (this.state === "closed") return;
    this.#setState("disconnected", { code, reason, status, willReconnect: false });
    this.#setState("closed", { code, reason, status, error });
  }

  // ---------------------------------------------------------------- tokens

  #scheduleRefresh(token) {
    clearTimeout(this.#refreshTimer);
    if (typeof this.options.token !== "function" || this.options.refresh === false) return;
    const exp = tokenExpiry(token);
    if (exp === undefined) return;
    const left = exp * 1000 - Date.now();
    const margin = Math.min(this.options.refreshMarginMs, left / 3);
    const delay = Math.max(0, left - margin);
    this.#refreshTimer = setTimeout(() => this.refreshToken().catch((e) => this.emit("error", e)), delay);
  }

  /** Fetches a fresh token now and sends it in an `auth` frame (the socket stays). */
  async refreshToken() {
    const token = await this.#currentToken(true);
    if (this.#send({ type: "auth", token })) {
      this.emit("token", { exp: tokenExpiry(token) });
      this.#scheduleRefresh(token);
    }
  }

  // ---------------------------------------------------------------- frames

  #onFrame(frame) {
    switch (frame.type) {
      case "message": return this.#onMessage(frame);
      case "subscribed": {
        const sub = this.#subs.get(frame.id);
        if (!sub) return;
        sub.state = "subscribed";
        sub.incarnation++;
        sub.attempts = 0;
        sub.queue = frame.queue ?? sub.queue;
        sub.emit("subscribed", { queue: sub.queue });
        sub._resolve(sub);
        return;
      }
      case "unsubscribed": {
        const sub = this.#subs.get(frame.id);
        if (sub?.unsubscribing > 0) sub.unsubscribing--;
        return;
      }
      case "confirm": {
        const entry = this.#pending.get(frame.id);
        if (!entry) return;
        this.#pending.delete(frame.id);
        entry.resolve({ messageId: frame.message_id, routed: frame.routed, idempotencyKey: entry.body.idempotency_key });
        return;
      }
      case "reply": {
        const entry = this.#pending.get(frame.id);
        if (!entry) return;
        this.#pending.delete(frame.id);
        const { type, id, ...reply } = frame;
        entry.resolve(camelKeys(reply));
        return;
      }
      case "error": return this.#onError(frame);
      default: return;
    }
  }

  #onError(frame) {
    const error = new WarrenError(frame.code, frame.detail ?? "", { id: frame.id });
    const entry = frame.id !== undefined ? this.#pending.get(frame.id) : undefined;
    if (entry) {
      // Our own resend racing the first attempt: ask again shortly, the answer is replayed.
      if (frame.code === "idempotency_key_in_use" && entry.resent) {
        entry.sent = false;
        setTimeout(() => { if (this.#pending.has(frame.id) && !entry.sent) this.#sendEntry(entry); }, 200);
        return;
      }
      this.#pending.delete(frame.id);
      return entry.reject(error);
    }
    const sub = frame.id !== undefined ? this.#subs.get(frame.id) : undefined;
    if (sub) {
      if (sub.state === "closed") return;
      if (sub.unsubscribing > 0 && frame.code === "invalid_request") { sub.unsubscribing--; return; }
      if (TRANSIENT.has(frame.code)) {
        // Broker lost (or busy): the subscription ended on Warren's side; subscribe again
        // with backoff; a durable one resumes from its queue, a stream from its offset.
        // A failed ack says the same while the subscription may still exist on Warren's
        // side: unsubscribe first (its answer, or "no such subscription", is swallowed).
        if (sub.state === "subscribed") {
          sub.unsubscribing++;
          this.#send({ type: "unsubscribe", id: sub.id });
        }
        sub.state = "pending";
        sub.emit("error", error);
        const delay = this.backoff(sub.attempts++);
        clearTimeout(sub.retryTimer);
        sub.retryTimer = setTimeout(() => this.#sendSubscribe(sub), delay);
        return;
      }
      if (sub.state === "subscribed" && frame.code === "invalid_request") {
        // An ack/nack Warren did not take: the delivery is redelivered; the subscription goes on.
        sub.emit("error", error);
        return;
      }
      sub.state = "failed";
      this.#subs.delete(sub.id);
      sub.emit("error", error);
      sub._reject(error);
      return;
    }
    this.emit("error", error);
  }

  #onMessage(frame) {
    const sub = this.#subs.get(frame.subscription);
    if (!sub || sub.state === "closed") return;
    if (sub.mode === "stream" && typeof frame.offset === "number") {
      if (sub.lastOffset !== undefined && frame.offset <= sub.lastOffset) return; // seen already
      sub.lastOffset = frame.offset;
    }
    const acks = sub.mode === "durable" || sub.mode === "queue";
    const generation = this.#generation;
    const incarnation = sub.incarnation;
    const settle = acks ? (kind, extra) => {
      // A delivery tag is only meaningful on the channel it came from: after a reconnect or
      // resubscribe the broker redelivers it, and an old tag must never ack a new message.
      if (generation !== this.#generation || incarnation !== sub.incarnation || (sub.state !== "subscribed" && sub.state !== "closing")) return false;
      return this.#send({ type: kind, subscription: sub.id, delivery_tag: frame.delivery_tag, multiple: false, ...extra });
    } : undefined;
    const message = new Message(frame, settle);
    const autoAck = acks && sub.spec.autoAck !== false;
    sub.chain = sub.chain.then(async () => {
      // A delivery whose channel is gone will be redelivered: skip it rather than handle it twice.
      if (acks && (generation !== this.#generation || incarnation !== sub.incarnation)) return;
      if (sub.state === "closed" || sub.state === "closing") return;
      try {
        await sub.handler(message);
        if (autoAck && !message.settled) message.ack();
      } catch (e) {
        sub.emit("error", e);
        if (autoAck && !message.settled) message.nack({ requeue: sub.spec.requeueOnError !== false });
      }
    });
  }

  #sendSubscribe(sub) {
    if (sub.state === "closed" || sub.state === "closing" || sub.state === "failed") return;
    if (this.#send(sub.frame())) sub.state = "subscribing";
  }

  #sendEntry(entry) {
    const frame = { type: entry.kind, id: entry.id, ...entry.body };
    if (this.#send(frame)) {
      if (entry.sentOnce) entry.resent = true;
      entry.sent = true;
      entry.sentOnce = true;
      if (entry.kind === "publish") this.#lastSentPublish = entry.id;
    }
  }

  // ---------------------------------------------------------------- API

  /**
   * Subscribes; `handler(message)` is called once per delivery, in order. Modes:
   * `live` (`exchange`, `bindingKey`), `durable` (+ `queue`, `prefetch`), `queue`
   * (`queue`, `prefetch`), `stream` (`stream`, `offset`, optional `bindingKey`).
   */
  subscribe(spec, handler) {
    if (typeof handler !== "function") throw new TypeError("subscribe: a handler function is required");
    if (this.state === "closed") throw new WarrenError("closed", "the client is closed");
    const mode = spec.mode ?? "live";
    if ((mode === "live" || mode === "durable") && (!spec.exchange || spec.bindingKey === undefined)) {
      throw new TypeError(`subscribe: mode ${mode} needs \`exchange\` and \`bindingKey\``);
    }
    if ((mode === "durable" || mode === "queue") && !spec.queue) throw new TypeError(`subscribe: mode ${mode} needs \`queue\``);
    if (mode === "stream" && !spec.stream) throw new TypeError("subscribe: mode stream needs `stream`");
    const id = spec.id ?? `s${this.#nextId++}`;
    if (this.#subs.has(id)) throw new TypeError(`subscribe: subscription id ${id} exists`);
    const sub = new Subscription(this, id, { ...spec, mode }, handler);
    this.#subs.set(id, sub);
    this.#sendSubscribe(sub);
    return sub;
  }

  async _unsubscribe(sub) {
    if (sub.state === "closed" || sub.state === "closing") return;
    clearTimeout(sub.retryTimer);
    if (sub.state === "subscribed") {
      // Let the handler that is running finish (and auto-ack); the ones not started are
      // skipped: the broker redelivers them to the next subscriber of a durable queue.
      sub.state = "closing";
      await sub.chain;
    }
    const wasLive = sub.state === "closing" || sub.state === "subscribing";
    sub.state = "closed";
    this.#subs.delete(sub.id);
    sub._reject(new WarrenError("unsubscribed", "the subscription was ended"));
    if (wasLive) this.#send({ type: "unsubscribe", id: sub.id });
  }

  /** The active subscriptions. */
  get subscriptions() { return [...this.#subs.values()]; }

  /**
   * Publishes with a publisher confirm: resolves `{ messageId, routed }` once the broker
   * has the message, rejects with a `WarrenError` carrying Warren's `code`. While
   * disconnected the publish waits for the connection. With `idempotencyKey` (a string,
   * or `true` for a generated one) a publish whose answer was lost with the connection is
   * sent again with the same key after the reconnect, so it is published once.
   */
  publish(message) { return this.#enqueue("publish", message); }

  /** Request/reply (SPEC §10): resolves with the reply (`{ messageId, correlationId, reply }`). */
  request(message) { return this.#enqueue("request", message); }

  #enqueue(kind, message) {
    if (this.state === "closed") return Promise.reject(new WarrenError("closed", "the client is closed"));
    let body;
    try { body = publishBody(message); } catch (e) { return Promise.reject(e); }
    if (kind === "publish" && message.idempotencyKey) {
      body.idempotency_key = message.idempotencyKey === true ? randomKey() : String(message.idempotencyKey);
    }
    const id = `${kind === "publish" ? "p" : "r"}${this.#nextId++}`;
    return new Promise((resolve, reject) => {
      const entry = { id, kind, body, resolve, reject, sent: false };
      this.#pending.set(id, entry);
      this.#sendEntry(entry);
    });
  }
}

export default Warren;
