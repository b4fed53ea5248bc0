// What the page says while the server turns its session away (close 1013,
// "try again later"), telling apart the two usual causes:
// - the model is still loading: the close reason says "loading" (errors.py,
//   ModelLoading). The page shows "The model is loading (N s so far)", with
//   the time from /readyz's `loading_s` (the page's own count when /readyz
//   cannot be read), polls /readyz and connects as soon as it is ready;
// - the server is at its session limit (ServerFull), or this address has too
//   many connections (TooManyFromAddress): said as such; the client retries.
// The notice stays until a session starts or the socket closes otherwise.

const TICK_MS = 1000; // the seconds shown
const POLL_MS = 2000; // /readyz while loading

/** /readyz beside the realtime endpoint: ws://host/v1/realtime -> http://host/readyz. */
export function readyzUrl(realtime) {
  try {
    const url = new URL(realtime);
    url.protocol = url.protocol === "wss:" ? "https:" : "http:";
    url.pathname = `${url.pathname.replace(/\/v1\/realtime\/?$/, "")}/readyz`;
    url.search = "";
    url.hash = "";
    return url.href;
  } catch {
    return null;
  }
}

export class ServerStatus {
  /**
   * @param {HTMLElement} el the notice (hidden when there is nothing to say)
   * @param {{readyz: string | null, onReady: () => void}} options onReady: the
   *   model finished loading (connect now instead of waiting for the retry)
   */
  constructor(el, { readyz, onReady }) {
    this.el = el;
    this.readyz = readyz;
    this.onReady = onReady;
    this.kind = null; // null, "loading", "ready" (connecting) or "full"
    this.since = 0; // Date.now() when the load began, as far as the page knows
    this.timers = [];
    this.polling = false;
  }

  /** The server closed the socket with 1013 and this reason. */
  refused(reason) {
    const text = reason || "";
    if (/loading/i.test(text)) {
      this.loading();
    } else if (/address/i.test(text)) {
      this.show("full", "Too many connections from this address; trying again shortly.");
    } else {
      this.show("full", "The server is at its session limit; trying again shortly.");
    }
  }

  loading() {
    if (this.kind !== "loading") {
      this.stop();
      this.kind = "loading";
      this.since = Date.now();
      this.timers.push(setInterval(() => this.render(), TICK_MS));
      this.timers.push(setInterval(() => this.poll(), POLL_MS));
    }
    this.render();
    this.poll();
  }

  async poll() {
    if (!this.readyz || this.polling) return;
    this.polling = true;
    try {
      const resp = await fetch(this.readyz, { cache: "no-store" });
      const body = await resp.json();
      if (this.kind !== "loading") return;
      if (body.status === "loading") {
        if (typeof body.loading_s === "number") this.since = Date.now() - body.loading_s * 1000;
        this.render();
      } else if (resp.ok) {
        this.show("ready", "The model is ready; connecting…");
        this.onReady();
      }
    } catch {
      /* unreachable or another origin: the count is the page's, the client retries */
    } finally {
      this.polling = false;
    }
  }

  render() {
    if (this.kind !== "loading") return;
    const seconds = Math.max(0, Math.round((Date.now() - this.since) / 1000));
    this.show("loading", `The model is loading (${seconds} s so far); connecting as soon as it is ready.`);
  }

  show(kind, text) {
    if (kind !== "loading") this.stop();
    this.kind = kind;
    this.el.dataset.kind = kind;
    this.el.textContent = text;
    this.el.hidden = false;
  }

  stop() {
    for (const timer of this.timers) clearInterval(timer);
    this.timers = [];
  }

  /** A session started, or the socket closed for another reason. */
  clear() {
    this.stop();
    this.kind = null;
    this.el.hidden = true;
    this.el.textContent = "";
    delete this.el.dataset.kind;
  }
}
