// Types for warren.js, the client of Warren's `warren.v1` WebSocket protocol.

export declare const VERSION: string;

/** Close codes Warren uses (SPEC §6). */
export declare const CloseCode: Readonly<{
  NORMAL: 1000;
  SHUTDOWN: 1001;
  POLICY: 1008;
  TOO_LARGE: 1009;
  TOKEN_EXPIRED: 4401;
  SLOW_CONSUMER: 4408;
}>;

/**
 * An error answered by Warren (`code` as in SPEC §4: `forbidden`, `unroutable`,
 * `exchange_not_found`, `idempotency_key_mismatch`, `broker_unavailable`, ...) or
 * raised by the client (`closed`, `connection_lost`, `frame_too_large`, `unsubscribed`,
 * `token_error`, `connect_failed`, `unauthorized`).
 */
export declare class WarrenError extends Error {
  constructor(code: string, detail: string, extra?: Record<string, unknown>);
  readonly code: string;
  readonly detail: string;
  /** The frame id the error answers, when Warren named one. */
  readonly id?: string;
  /** The close code of the connection the error came with. */
  readonly closeCode?: number;
  /** The HTTP status of a refused upgrade (from the probe), when known. */
  readonly status?: number;
}

/** A token, or a function returning one (called again for refreshes and after 4401/401). */
export type TokenSource = string | (() => string | Promise<string>);

export interface ReconnectOptions {
  /** First delay (default 500 ms). */
  initialDelayMs?: number;
  /** Cap of the delay (default 30000 ms). */
  maxDelayMs?: number;
  /** Growth per attempt (default 2). */
  factor?: number;
  /** Share of the delay taken off at random, 0..1 (default 0.5). */
  jitter?: number;
}

export interface WarrenOptions {
  /** The JWT, or a function returning it. Sent as a `bearer.<jwt>` subprotocol. */
  token?: TokenSource;
  /** A WebSocket constructor (e.g. from the `ws` package); default `globalThis.WebSocket`. */
  WebSocket?: new (url: string, protocols?: string | string[]) => WebSocket;
  /** Backoff of reconnects, or `false` never to reconnect. */
  reconnect?: ReconnectOptions | false;
  /** Refresh a function token this long before `exp` (at most a third of its lifetime; default 30000). */
  refreshMarginMs?: number;
  /** `false`: never send `auth` frames; the client reconnects with a fresh token after 4401 instead. */
  refresh?: boolean;
  /** After a failed upgrade, `GET` the endpoint to learn its 401/403 (default true). */
  probe?: boolean;
  /** Connect in the constructor (default true); else call `connect()`. */
  autoConnect?: boolean;
}

export type State = "idle" | "connecting" | "connected" | "disconnected" | "closed";

export interface StateEvent {
  state: State;
  /** The WebSocket close code (`disconnected`, `closed`): 1001, 1006, 1008, 4401, 4408, ... */
  code?: number;
  reason?: string;
  /** HTTP status of a refused upgrade, when the probe learned it (401, 403, 429). */
  status?: number;
  /** `disconnected`: whether a reconnect is scheduled, and after how long. */
  willReconnect?: boolean;
  delayMs?: number;
  /** `connecting`: the reconnect attempt (0 for the first). */
  attempt?: number;
  /** `closed`: why the client stopped for good. */
  error?: WarrenError;
}

export interface EventMap {
  state: StateEvent;
  connecting: StateEvent;
  connected: StateEvent;
  disconnected: StateEvent;
  closed: StateEvent;
  /** A refreshed token was sent (`exp` in Unix seconds). */
  token: { exp?: number };
  /** An error frame not tied to a publish or subscription (e.g. a refused `auth`). */
  error: WarrenError;
}

/** AMQP properties, camelCase (`messageId`, `correlationId`, `replyTo`, `expirationMs`, ...). */
export interface Properties {
  contentType?: string;
  contentEncoding?: string;
  messageId?: string;
  correlationId?: string;
  replyTo?: string;
  type?: string;
  appId?: string;
  userId?: string;
  expirationMs?: number;
  priority?: number;
  timestamp?: number;
  persistent?: boolean;
  headers?: Record<string, unknown>;
  [key: string]: unknown;
}

export interface PublishMessage {
  exchange: string;
  routingKey: string;
  /** Any JSON (content type application/json). */
  payload?: unknown;
  /** Text (text/plain) or bytes (application/octet-stream, sent as base64). */
  body?: string | Uint8Array | ArrayBuffer;
  bodyBase64?: string;
  contentType?: string;
  properties?: Properties;
  /** Default true: an unroutable message is refused with `unroutable`. */
  mandatory?: boolean;
  /**
   * A key makes the publish safe to retry: after a lost connection it is sent again
   * with the same key and lands once. `true` generates one.
   */
  idempotencyKey?: string | true;
}

export interface RequestMessage extends Omit<PublishMessage, "idempotencyKey"> {
  /** How long Warren waits for the reply (SPEC §10). */
  timeoutMs?: number;
}

export interface Confirm {
  messageId: string;
  routed: boolean;
  idempotencyKey?: string;
}

export interface Reply {
  messageId?: string;
  correlationId?: string;
  properties?: Record<string, unknown>;
  payload?: unknown;
  body?: string;
  bodyBase64?: string;
  [key: string]: unknown;
}

export type Mode = "live" | "durable" | "queue" | "stream";

export interface SubscribeSpec {
  /** Default `live`. `queue` and `stream` need a Warren that offers SPEC §9/§11. */
  mode?: Mode;
  /** live, durable (and optionally stream, as a filter). */
  exchange?: string;
  bindingKey?: string;
  /** durable: the subscription's name (resumed by every reconnect); queue: the queue. */
  queue?: string;
  prefetch?: number;
  /** stream: its name and where to start; after a reconnect it resumes after the last offset seen. */
  stream?: string;
  offset?: "first" | "last" | "next" | number | { timestamp: string };
  /** `cloudevents` (SPEC §12): each message as `m.event`, a structured CloudEvent. */
  format?: string;
  /** durable/queue: ack after the handler resolves (default true); a throwing handler nacks. */
  autoAck?: boolean;
  /** durable/queue: requeue when the handler throws (default true). */
  requeueOnError?: boolean;
  /** The subscription id on the socket (default generated). */
  id?: string;
}

export interface Message<T = unknown> {
  readonly subscription: string;
  readonly exchange: string;
  readonly routingKey: string;
  readonly redelivered: boolean;
  readonly deliveryTag: number;
  /** stream subscriptions: the stream offset. */
  readonly offset?: number;
  readonly properties: Properties;
  /** `format: "cloudevents"`: the message as a structured CloudEvent (then no properties or payload). */
  readonly event?: Record<string, unknown>;
  /** JSON content. */
  readonly payload?: T;
  /** Other content, base64. */
  readonly bodyBase64?: string;
  /** The body as bytes. */
  readonly body: Uint8Array;
  /** The raw server frame. */
  readonly frame: Record<string, unknown>;
  readonly settled: boolean;
  text(): string;
  /**
   * durable/queue: acknowledge. `false` when not sent: the socket it came on is gone (the
   * broker redelivers it), it was settled already, or the subscription is live.
   */
  ack(): boolean;
  nack(options?: { requeue?: boolean }): boolean;
}

export type Handler<T = unknown> = (message: Message<T>) => void | Promise<void>;

export type SubscriptionState = "pending" | "subscribing" | "subscribed" | "closing" | "failed" | "closed";

export interface Subscription {
  readonly id: string;
  readonly mode: Mode;
  readonly spec: SubscribeSpec;
  readonly state: SubscriptionState;
  /** durable: the broker queue (`warren.<tenant>.<queue>`). */
  readonly queue?: string;
  /** stream: the last offset delivered. */
  readonly lastOffset?: number;
  /** Resolves on the first `subscribed`; rejects with Warren's error if refused. */
  readonly ready: Promise<Subscription>;
  /** Lets the running handler finish (and auto-ack), then unsubscribes. */
  unsubscribe(): Promise<void>;
  on(event: "subscribed", fn: (e: { queue?: string }) => void): () => void;
  on(event: "error", fn: (e: unknown) => void): () => void;
}

export declare function tokenExpiry(token: string): number | undefined;

export declare class Warren {
  constructor(url: string | URL, options?: WarrenOptions);
  /** `http(s)://host` becomes `ws(s)://host/v1/ws`; a URL with a path is kept. */
  static socketUrl(url: string | URL): string;
  readonly url: string;
  readonly state: State;
  readonly closeCode?: number;
  readonly closeReason?: string;
  readonly subscriptions: Subscription[];
  connect(): void;
  close(code?: number, reason?: string): void;
  /** Resolves once connected; rejects with the reason if the client stops for good. */
  ready(): Promise<void>;
  subscribe<T = unknown>(spec: SubscribeSpec, handler: Handler<T>): Subscription;
  publish(message: PublishMessage): Promise<Confirm>;
  request(message: RequestMessage): Promise<Reply>;
  refreshToken(): Promise<void>;
  /** The delay before reconnect attempt `n`. */
  backoff(n: number): number;
  on<K extends keyof EventMap>(event: K, fn: (e: EventMap[K]) => void): () => void;
  once<K extends keyof EventMap>(event: K, fn: (e: EventMap[K]) => void): () => void;
  off<K extends keyof EventMap>(event: K, fn: (e: EventMap[K]) => void): void;
}

export default Warren;
