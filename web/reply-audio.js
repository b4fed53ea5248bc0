// Spoken replies in the page, from either path:
// - WebRTC: the server's outgoing track on the peer connection, played by an
//   <audio> element (so the browser's echo cancellation knows what is played
//   and removes it from the microphone). The track is live all the time
//   (silence between replies); the element is muted while the user mutes and
//   after a reply is stopped, until the next reply.audio.started.
// - WebSocket (?transport=ws, or before the peer connection is up): binary
//   PCM16 frames between reply.audio.started and reply.audio.done, played by an
//   AudioWorklet (player-worklet.js) at the announced sample_rate.
// stop() silences both at once (reply.cancelled, reply.audio.done with
// cancelled, the user speaking over the reply). The mute choice is kept in
// localStorage; while muted, session.start asks for no audio (speak: false).
//
// For tests and the curious: window.__voiceAgentPlayback holds live counters
// (samplesReceived and samplesPlayed on the WebSocket path, at the announced
// and the context's rate; stops; replies) and the <audio> element carries
// data-source ("webrtc" while a track is attached), data-playing, data-state
// ("speaking", "idle", "stopped") and data-reply-id.

const MUTE_KEY = "voice_agent.muted";
const WEBRTC_TAIL_MS = 1500; // the track plays on after reply.audio.done (server buffer + jitter)
const MAX_PENDING = 500; // frames kept while the worklet loads (20 s of 40 ms frames)

export function storedMuted() {
  try {
    return window.localStorage.getItem(MUTE_KEY) === "1";
  } catch {
    return false; // storage disabled
  }
}

export function storeMuted(muted) {
  try {
    window.localStorage.setItem(MUTE_KEY, muted ? "1" : "0");
  } catch {
    /* storage disabled: the choice lasts as long as the page */
  }
}

export class ReplyAudio {
  /** @param {HTMLAudioElement} el the element that plays the WebRTC track */
  constructor(el, { muted = false } = {}) {
    this.el = el;
    this.muted = muted;
    this.interrupted = false; // stopped: silent until the next reply's audio
    this.replyId = null; // the reply whose audio is coming
    this.rate = 16000; // the announced sample_rate
    this.tailUntil = 0; // performance.now() until which the track may still play a reply
    this.ctx = null;
    this.node = null;
    this.loading = null; // the worklet being set up
    this.pending = []; // {pcm, rate} frames that came while it loads
    this.stats = {
      samplesReceived: 0,
      samplesPlayed: 0,
      queued: 0,
      dropped: 0,
      contextRate: 0,
      stops: 0,
      replies: 0,
    };
    window.__voiceAgentPlayback = this.stats;
    el.autoplay = true;
    el.setAttribute("playsinline", "");
    for (const type of ["playing", "pause", "emptied", "ended"]) el.addEventListener(type, () => this.show());
    this.applyMute();
    this.show("idle");
  }

  // ------------------------------------------------------------ WebRTC

  /** The server's track (a MediaStream), or null when the peer connection is gone. */
  attachTrack(stream) {
    if (!stream) {
      this.el.srcObject = null;
      this.show();
      return;
    }
    this.el.srcObject = stream;
    for (const track of stream.getAudioTracks()) track.addEventListener("ended", () => this.show());
    this.applyMute();
    this.el.play().catch(() => {
      /* autoplay blocked until a click: unlock() tries again */
    });
    this.show();
  }

  // ------------------------------------------------------------ reply events

  /** reply.audio.started */
  begin(replyId, rate) {
    this.replyId = replyId;
    this.rate = rate || 16000;
    this.interrupted = false;
    this.stats.replies += 1;
    this.applyMute();
    this.show("speaking");
  }

  /** A binary frame (PCM16 mono at the announced rate). */
  push(buffer) {
    if (!this.replyId || this.muted || this.interrupted || buffer.byteLength < 2) return;
    this.stats.samplesReceived += buffer.byteLength >> 1;
    const frame = { pcm: buffer.byteLength % 2 ? buffer.slice(0, buffer.byteLength - 1) : buffer, rate: this.rate };
    if (this.node) {
      this.node.port.postMessage({ type: "pcm", ...frame }, [frame.pcm]);
      return;
    }
    if (this.pending.length < MAX_PENDING) this.pending.push(frame);
    else this.stats.dropped += buffer.byteLength >> 1;
    this.openWorklet();
  }

  /** reply.audio.done */
  end(replyId, cancelled) {
    if (replyId !== this.replyId) return;
    if (cancelled) {
      this.stop();
      return;
    }
    this.replyId = null;
    this.tailUntil = performance.now() + WEBRTC_TAIL_MS;
    this.show("idle");
  }

  /** Whether a reply may be audible now. */
  get active() {
    return Boolean(this.replyId) || this.stats.queued > 0 || this.pending.length > 0 || performance.now() < this.tailUntil;
  }

  /** Silence the reply now (cancelled, or the user speaks over it). */
  stop() {
    if (this.active) this.stats.stops += 1;
    this.replyId = null;
    this.tailUntil = 0;
    this.interrupted = true;
    this.clearQueue();
    this.applyMute();
    this.show("stopped");
  }

  setMuted(muted) {
    this.muted = muted;
    if (muted) this.clearQueue();
    this.applyMute();
    this.show();
  }

  /** Call from a user gesture: browsers start audio only after one. */
  unlock() {
    if (this.ctx && this.ctx.state === "suspended") this.ctx.resume().catch(() => {});
    if (this.el.srcObject && this.el.paused) this.el.play().catch(() => {});
  }

  // ------------------------------------------------------------ internals

  applyMute() {
    this.el.muted = this.muted || this.interrupted;
  }

  clearQueue() {
    this.pending = [];
    this.stats.queued = 0;
    if (this.node) this.node.port.postMessage({ type: "clear" });
  }

  openWorklet() {
    if (this.loading) return;
    this.loading = (async () => {
      let ctx;
      try {
        ctx = new AudioContext({ sampleRate: this.rate, latencyHint: "interactive" });
      } catch {
        ctx = new AudioContext(); // this rate is not supported: the worklet resamples
      }
      try {
        await ctx.audioWorklet.addModule(new URL("./player-worklet.js", import.meta.url));
        const node = new AudioWorkletNode(ctx, "reply-pcm16", { numberOfInputs: 0, outputChannelCount: [1] });
        node.port.onmessage = (ev) => {
          this.stats.samplesPlayed = ev.data.played;
          this.stats.queued = ev.data.queued;
          this.stats.dropped = ev.data.dropped;
        };
        node.connect(ctx.destination);
        if (ctx.state === "suspended") ctx.resume().catch(() => {});
        this.ctx = ctx;
        this.node = node;
        this.stats.contextRate = ctx.sampleRate;
        const frames = this.pending;
        this.pending = [];
        for (const f of frames) node.port.postMessage({ type: "pcm", ...f }, [f.pcm]);
      } catch (err) {
        console.warn("reply audio cannot play here:", err && err.message ? err.message : err);
        this.pending = [];
        ctx.close();
        this.loading = null; // try again with the next frame
      }
    })();
  }

  show(state) {
    const el = this.el;
    if (state) el.dataset.state = state;
    el.dataset.replyId = this.replyId || "";
    el.dataset.muted = String(this.muted);
    const stream = el.srcObject;
    const track = stream && stream.getAudioTracks ? stream.getAudioTracks()[0] : null;
    el.dataset.source = track ? "webrtc" : "none";
    el.dataset.playing = String(Boolean(track && track.readyState === "live" && !el.paused));
  }
}
