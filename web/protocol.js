// Client for the realtime WebSocket (/v1/realtime): connects, sends
// session.start, dispatches server events by type, and reconnects with
// backoff, resuming the conversation with the previous session_id.

const NO_RETRY_CODES = new Set([1008, 1009]); // policy (token / origin), frame too big

export class RealtimeClient {
  /**
   * @param {string} url ws:// or wss:// URL of /v1/realtime
   * @param {object} start extra session.start fields (token, device, speak, ...)
   */
  constructor(url, start = {}) {
    this.url = url;
    this.start = start;
    this.sessionId = null;
    this.ready = false; // true between session.started and close
    this.ws = null;
    this.handlers = new Map();
    this.attempt = 0;
    this.timer = null;
    this.stopped = false;
  }

  /** Register a handler for a server event type, or for the pseudo events
   * "connection" ({state}), "close" ({code, reason}) and "audio" (ArrayBuffer). */
  on(type, fn) {
    if (!this.handlers.has(type)) this.handlers.set(type, []);
    this.handlers.get(type).push(fn);
    return this;
  }

  emit(type, payload) {
    for (const fn of this.handlers.get(type) || []) {
      try {
        fn(payload);
      } catch (err) {
        console.error(`handler for ${type} failed`, err);
      }
    }
  }

  connect() {
    this.stopped = false;
    clearTimeout(this.timer);
    this.emit("connection", { state: this.attempt ? "reconnecting" : "connecting" });
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (err) {
      this.emit("error", { code: "connect", message: String(err.message || err) });
      this.scheduleReconnect();
      return;
    }
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => {
      const msg = { type: "session.start", sample_rate: 16000, channels: 1, format: "pcm16", ...this.start };
      if (this.sessionId) msg.session_id = this.sessionId;
      ws.send(JSON.stringify(msg));
    };
    ws.onmessage = (ev) => {
      if (typeof ev.data !== "string") {
        this.emit("audio", ev.data);
        return;
      }
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (!msg || typeof msg.type !== "string") return;
      if (msg.type === "session.started") {
        this.sessionId = msg.session_id || this.sessionId;
        this.ready = true;
        this.attempt = 0;
        this.emit("connection", { state: "connected" });
      }
      this.emit(msg.type, msg);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.ready = false;
      this.emit("close", { code: ev.code, reason: ev.reason });
      if (this.stopped || NO_RETRY_CODES.has(ev.code)) {
        this.emit("connection", { state: "disconnected" });
        return;
      }
      this.scheduleReconnect(ev.code === 1013 ? 5000 : 0);
    };
  }

  scheduleReconnect(minDelay = 0) {
    this.attempt += 1;
    const base = Math.min(10000, 500 * 2 ** (this.attempt - 1));
    const delay = Math.max(minDelay, base * (0.75 + Math.random() * 0.5));
    this.emit("connection", { state: "reconnecting", delay });
    this.timer = setTimeout(() => this.connect(), delay);
  }

  close() {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.ws) this.ws.close(1000, "bye");
  }

  /** Send a JSON event; false when the session is not up. */
  send(event) {
    if (!this.ready || !this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(event));
    return true;
  }

  /** Send one binary audio frame; false (dropped) when the session is not up. */
  sendAudio(buffer) {
    if (!this.ready || !this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    // Do not queue up seconds of audio on a stalled socket.
    if (this.ws.bufferedAmount > 64000) return false;
    this.ws.send(buffer);
    return true;
  }
}

/** The realtime URL: ?server=... wins, then the page's own host, then the default port. */
export function realtimeUrl(params, loc = window.location) {
  if (params.get("server")) return params.get("server");
  if (loc.protocol === "http:" || loc.protocol === "https:") {
    return `${loc.protocol === "https:" ? "wss" : "ws"}://${loc.host}/v1/realtime`;
  }
  return "ws://127.0.0.1:8765/v1/realtime";
}
