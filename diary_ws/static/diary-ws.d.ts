// Types for diary-ws.js, the browser client served at /api/v1/ws/client.js. docs/browser-client.md has the prose.

/** A frame the server pushes: the guide's `{type, message}` plus `id`, `sent_at` and, when sent, `data`. */
export interface DiaryMessage {
  type: string;
  message: string;
  /** "<ms>-<seq>"; ids compare as that pair of integers. */
  id: string;
  /** RFC 3339, UTC. */
  sent_at: string;
  data?: Record<string, unknown>;
  [key: string]: unknown;
}

/** A token, or a function (sync or async) that fetches a fresh one. */
export type TokenSource = string | (() => string | Promise<string>);

export interface Logger {
  debug?(...args: unknown[]): void;
  info?(...args: unknown[]): void;
  warn?(...args: unknown[]): void;
}

export interface DiaryClientOptions {
  /** A listener JWT (sent as `?token=`), or a function that fetches one. A function is called again after a
   *  4001 close, when the token is about to expire, and after a connection could not be opened. */
  token?: TokenSource | null;
  /** Resume from this id on the first connection (e.g. one kept in localStorage). */
  since?: string | null;
  /** Seconds between the server's heartbeat frames (1-300), or 0 for none. Default 30. The connection is
   *  dropped and reopened when no frame arrives for twice that plus a second. WebSocket only. */
  heartbeat?: number;
  /** Fall back to EventSource on /api/v1/sse/{user_id} when a WebSocket cannot be opened. Default true. */
  fallback?: boolean;
  /** Exponential backoff with full jitter, in milliseconds. Default {base: 500, cap: 30000}. */
  backoff?: { base?: number; cap?: number };
  /** A connection that stayed up this long (ms) resets the backoff. Default 5000. */
  healthyAfter?: number;
  /** A WebSocket not open after this long (ms) counts as one that cannot open. Default 10000. */
  openTimeout?: number;
  /** The most a reconnect after 4001 or 4008 waits (ms), jittered. Default 1000. */
  shortDelay?: number;
  /** Where the client says what it does (e.g. `console`). Default: silent. */
  logger?: Logger | null;
}

export type Transport = "websocket" | "sse";
export type ClientState = "idle" | "connecting" | "open" | "waiting" | "stopped";

export interface OpenDetail {
  transport: Transport;
  connections: number;
}
export interface CloseDetail {
  /** The WebSocket close code; null for a stream that ended or a heartbeat watchdog. */
  code: number | null;
  reason: string;
  transport: Transport | null;
}
export interface ReconnectingDetail {
  delay: number;
  code: number | null;
  reason: string;
  since: string | null;
}
export interface ResumeDetail {
  recovered: boolean;
  replayed: number;
  since: string | null;
}
export interface StoppedDetail {
  code: number;
  reason: string;
  /** True when the server ended it (4003, or 4001 without a token function). */
  byServer: boolean;
}

export interface DiaryClientEventMap {
  open: CustomEvent<OpenDetail>;
  close: CustomEvent<CloseDetail>;
  reconnecting: CustomEvent<ReconnectingDetail>;
  message: CustomEvent<DiaryMessage>;
  resume: CustomEvent<ResumeDetail>;
  /** A resume frame said `recovered: false`: messages since `since` may have been missed. */
  missed: CustomEvent<ResumeDetail>;
  stopped: CustomEvent<StoppedDetail>;
}

/** The error `connect()` rejects with when the client stops before it connected. */
export interface StoppedError extends Error {
  code: number;
  reason: string;
}

export class DiaryWebSocketClient extends EventTarget {
  /** @param baseUrl http(s):// or ws(s):// plus any prefix; by default the server the module came from. */
  constructor(userId: string, baseUrl?: string, options?: DiaryClientOptions);
  readonly userId: string;
  readonly baseUrl: string;
  readonly options: Required<DiaryClientOptions>;
  readonly messageHandlers: Map<string, (message: DiaryMessage) => void>;
  readonly isConnected: boolean;
  /** The open WebSocket (the guide's field); null on the fallback stream and between connections. */
  readonly ws: WebSocket | null;
  readonly transport: Transport | null;
  readonly state: ClientState;
  /** What the latest resume frame said; null before any. */
  readonly recovered: boolean | null;
  /** Transports opened so far. */
  readonly connections: number;
  /** Messages dropped because their id was not newer than the last one delivered. */
  readonly duplicates: number;
  /** The id of the last message delivered, where a reconnect resumes. */
  readonly lastId: string | null;

  connect(): Promise<void>;
  disconnect(): void;
  onMessage(type: string, handler: (message: DiaryMessage) => void): void;
  onNotification(handler: (message: DiaryMessage) => void): void;
  onResume(handler: (recovered: boolean, replayed: number) => void): void;
  handleMessage(message: DiaryMessage): void;

  addEventListener<K extends keyof DiaryClientEventMap>(
    type: K,
    listener: (this: DiaryWebSocketClient, event: DiaryClientEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
  removeEventListener<K extends keyof DiaryClientEventMap>(
    type: K,
    listener: (this: DiaryWebSocketClient, event: DiaryClientEventMap[K]) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | EventListenerOptions,
  ): void;
}

export default DiaryWebSocketClient;
