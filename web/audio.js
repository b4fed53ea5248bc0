// Audio in and out for the page: microphone capture (16 kHz PCM16 frames from
// mic-worklet.js), the input transports (WebRTC by default, WebSocket PCM as
// the fallback and with ?transport=ws), a recorder of what was sent, and PCM
// playback of recorded utterances. The spoken replies are played by
// reply-audio.js (WebRTC hands it the server's track through onRemoteAudio).

export const RATE = 16000;

const ICE_GATHER_TIMEOUT_MS = 3000; // no trickle ICE: the offer carries every candidate
const ANSWER_TIMEOUT_MS = 5000; // then the WebSocket PCM path takes over

/** Open the microphone; calls onFrame(ArrayBuffer of 320 PCM16 samples) every 20 ms.
 * Returns {stream, stop()}: the MediaStream (its track also feeds WebRTC) and a stop. */
async function openMic(onFrame) {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new Error("No microphone access here: open the page over https or on localhost.");
  }
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
  });
  const ctx = new AudioContext();
  try {
    await ctx.audioWorklet.addModule(new URL("./mic-worklet.js", import.meta.url));
  } catch (err) {
    stream.getTracks().forEach((t) => t.stop());
    await ctx.close();
    throw err;
  }
  const source = ctx.createMediaStreamSource(stream);
  const node = new AudioWorkletNode(ctx, "mic-pcm16", { numberOfOutputs: 1 });
  const mute = ctx.createGain();
  mute.gain.value = 0; // keeps the node pulled by the graph without making a sound
  source.connect(node).connect(mute).connect(ctx.destination);
  node.port.onmessage = (ev) => onFrame(ev.data);
  if (ctx.state === "suspended") await ctx.resume();
  return {
    stream,
    stop() {
      node.port.onmessage = null;
      source.disconnect();
      node.disconnect();
      stream.getTracks().forEach((t) => t.stop());
      ctx.close();
    },
  };
}

/** Input level 0..1 from one PCM16 frame (RMS, -60..0 dBFS). */
function frameLevel(pcm) {
  let sum = 0;
  for (let i = 0; i < pcm.length; i++) sum += pcm[i] * pcm[i];
  const rms = Math.sqrt(sum / pcm.length) / 32768;
  const db = 20 * Math.log10(rms + 1e-9);
  return Math.max(0, Math.min(1, (db + 60) / 60));
}

/** Microphone to the server as binary PCM16 WebSocket frames (?transport=ws). */
class WsPcmInput {
  constructor(client, onSent) {
    this.client = client;
    this.onSent = onSent;
    this.mic = null;
    this.level = 0;
    this.name = "ws";
    this.onchange = null; // (name) => void; the name never changes here
  }

  async start() {
    this.mic = await openMic((buffer) => {
      const pcm = new Int16Array(buffer);
      this.level = Math.max(frameLevel(pcm), this.level * 0.8);
      if (this.client.sendAudio(buffer)) this.onSent(pcm);
    });
  }

  /** The socket closed / a new session started: frames just flow again. */
  suspend() {}

  renegotiate() {}

  onAnswer() {}

  onServerError() {
    return false;
  }

  stop() {
    if (this.mic) this.mic.stop();
    this.mic = null;
    this.level = 0;
  }
}

/** Resolves when ICE gathering is complete, or after `ms` (with what was gathered). */
function iceGatheringComplete(pc, ms) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    };
    const check = () => {
      if (pc.iceGatheringState === "complete") done();
    };
    const timer = setTimeout(done, ms);
    pc.addEventListener("icegatheringstatechange", check);
  });
}

/** ICE servers from ?ice=: a JSON array of RTCIceServer, or comma-separated URLs. */
export function iceServersFrom(value) {
  if (!value) return [];
  try {
    if (value.trim().startsWith("[")) {
      const list = JSON.parse(value);
      return Array.isArray(list) ? list : [];
    }
  } catch {
    return [];
  }
  return value
    .split(",")
    .map((u) => u.trim())
    .filter(Boolean)
    .map((urls) => ({ urls }));
}

/**
 * Microphone to the server as a WebRTC (Opus) track negotiated over the session
 * WebSocket (webrtc.offer -> webrtc.answer, no trickle ICE). The AudioWorklet
 * still taps the same microphone for the level meter and the local recording,
 * but sends nothing on the socket, unless WebRTC is unavailable, refused or
 * unanswered: then this input falls back to the WebSocket PCM path.
 */
class WebRtcInput {
  constructor(client, onSent, { iceServers = [], onRemoteAudio = null } = {}) {
    this.client = client;
    this.onSent = onSent;
    this.iceServers = iceServers;
    this.onRemoteAudio = onRemoteAudio; // (MediaStream | null) => void: the spoken replies
    this.mic = null;
    this.pc = null;
    this.level = 0;
    this.name = "webrtc"; // "ws" after a fallback
    this.onchange = null; // (name) => void when the transport in use changes
    this.flowing = false; // the peer connection is connected: audio reaches the server
    this.refused = typeof RTCPeerConnection !== "function"; // never try WebRTC again
    this.pending = null; // {resolve, reject} while an answer is awaited
    this.generation = 0; // bumped by every (re)negotiation and stop; stale ones give up
  }

  async start() {
    this.mic = await openMic((buffer) => this.frame(buffer));
    await this.negotiate();
  }

  frame(buffer) {
    const pcm = new Int16Array(buffer);
    this.level = Math.max(frameLevel(pcm), this.level * 0.8);
    if (this.name === "ws") {
      if (this.client.sendAudio(buffer)) this.onSent(pcm);
    } else if (this.flowing) {
      this.onSent(pcm); // what the track carries, for the local play-back control
    }
  }

  setName(name) {
    if (this.name === name) return;
    this.name = name;
    if (this.onchange) this.onchange(name);
  }

  /** Offer a peer connection carrying the mic track; falls back to WS PCM on failure. */
  async negotiate() {
    const gen = ++this.generation;
    this.closePeer();
    if (!this.mic) return;
    if (this.refused) {
      this.setName("ws");
      return;
    }
    if (!this.client.ready) return; // renegotiate() runs again on session.started
    let pc;
    try {
      pc = new RTCPeerConnection({ iceServers: this.iceServers });
    } catch (err) {
      this.fallback(err, true);
      return;
    }
    this.pc = pc;
    this.flowing = false;
    pc.addEventListener("connectionstatechange", () => {
      if (this.pc !== pc) return;
      this.flowing = pc.connectionState === "connected";
    });
    pc.addEventListener("track", (ev) => {
      if (this.pc !== pc || ev.track.kind !== "audio" || !this.onRemoteAudio) return;
      this.onRemoteAudio(ev.streams[0] || new MediaStream([ev.track]));
    });
    try {
      // sendrecv: the microphone goes out, the spoken replies come back on the
      // same m-line (the server answers recvonly when it does not speak).
      for (const track of this.mic.stream.getAudioTracks()) {
        pc.addTransceiver(track, { direction: "sendrecv", streams: [this.mic.stream] });
      }
      await pc.setLocalDescription(await pc.createOffer());
      await iceGatheringComplete(pc, ICE_GATHER_TIMEOUT_MS);
      if (gen !== this.generation) return;
      const answer = this.awaitAnswer(ANSWER_TIMEOUT_MS);
      if (!this.client.send({ type: "webrtc.offer", sdp: pc.localDescription.sdp })) {
        this.pending = null;
        throw new Error("not connected");
      }
      const msg = await answer;
      if (gen !== this.generation) return;
      await pc.setRemoteDescription({ type: "answer", sdp: msg.sdp });
      this.setName("webrtc");
    } catch (err) {
      if (gen !== this.generation) return;
      this.fallback(err, Boolean(err && err.refused));
    }
  }

  awaitAnswer(ms) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending = null;
        reject(new Error(`no webrtc.answer in ${ms} ms`));
      }, ms);
      this.pending = {
        resolve: (msg) => {
          clearTimeout(timer);
          resolve(msg);
        },
        reject: (err) => {
          clearTimeout(timer);
          reject(err);
        },
      };
    });
  }

  /** A webrtc.answer from the server (routed here by the page). */
  onAnswer(msg) {
    const p = this.pending;
    this.pending = null;
    if (p && msg && typeof msg.sdp === "string") p.resolve(msg);
  }

  /** An error event while an answer is awaited is the offer's refusal: true = handled. */
  onServerError(msg) {
    const p = this.pending;
    if (!p) return false;
    this.pending = null;
    const err = new Error(`webrtc.offer refused: ${msg.code || "error"}: ${msg.message || ""}`);
    err.refused = true;
    p.reject(err);
    return true;
  }

  fallback(err, refused) {
    console.info("WebRTC unavailable, sending PCM over the WebSocket:", err && err.message ? err.message : err);
    if (refused) this.refused = true;
    this.closePeer();
    this.setName("ws");
  }

  closePeer() {
    this.flowing = false;
    if (this.pending) {
      const p = this.pending;
      this.pending = null;
      p.reject(new Error("superseded"));
    }
    if (this.pc) {
      const pc = this.pc;
      this.pc = null;
      try {
        pc.close();
      } catch {
        /* already closed */
      }
    }
    if (this.onRemoteAudio) this.onRemoteAudio(null);
  }

  /** The socket closed: the server dropped its end of the peer connection. */
  suspend() {
    this.generation++;
    this.closePeer();
  }

  /** A (new) session started on a re-opened socket: negotiate WebRTC again. */
  renegotiate() {
    if (!this.mic) return;
    if (!this.refused) this.setName("webrtc"); // frames wait for the track, not the socket
    this.negotiate();
  }

  stop() {
    this.generation++;
    this.closePeer();
    if (this.mic) this.mic.stop();
    this.mic = null;
    this.level = 0;
  }
}

const TRANSPORTS = { ws: WsPcmInput, webrtc: WebRtcInput };

/** The audio input for ?transport=NAME (default webrtc); onSent(Int16Array) sees each
 * frame that reached the server. options: {iceServers} for WebRTC. */
export function createAudioInput(kind, client, onSent, options = {}) {
  const Input = TRANSPORTS[kind] || TRANSPORTS.webrtc;
  return new Input(client, onSent, options);
}

/** What was sent in this session, by stream position, so utterances can be cut out. */
export class Recorder {
  constructor(keepSeconds = 120) {
    this.keep = keepSeconds * RATE;
    this.reset();
  }

  reset() {
    this.chunks = []; // {pos, pcm}
    this.pos = 0; // samples sent since session.started
  }

  append(pcm) {
    this.chunks.push({ pos: this.pos, pcm });
    this.pos += pcm.length;
    while (this.chunks.length && this.chunks[0].pos + this.chunks[0].pcm.length < this.pos - this.keep) {
      this.chunks.shift();
    }
  }

  /** PCM16 samples from start_ms to end_ms (what is still kept), or null. */
  cut(startMs, endMs) {
    const from = Math.round((startMs * RATE) / 1000);
    const to = Math.min(Math.round((endMs * RATE) / 1000), this.pos);
    if (to <= from) return null;
    const out = new Int16Array(to - from);
    let got = 0;
    for (const { pos, pcm } of this.chunks) {
      const a = Math.max(from, pos);
      const b = Math.min(to, pos + pcm.length);
      if (b > a) {
        out.set(pcm.subarray(a - pos, b - pos), a - from);
        got += b - a;
      }
    }
    return got ? out : null;
  }
}

/** Plays whole PCM16 mono clips (the recorded utterances). */
export class Player {
  constructor() {
    this.ctx = null;
    this.sources = new Set();
  }

  context() {
    if (!this.ctx) this.ctx = new AudioContext();
    if (this.ctx.state === "suspended") this.ctx.resume();
    return this.ctx;
  }

  schedule(pcm, rate, when) {
    const ctx = this.context();
    const buf = ctx.createBuffer(1, pcm.length, rate);
    const data = buf.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) data[i] = pcm[i] / 32768;
    const src = ctx.createBufferSource();
    src.buffer = buf;
    src.connect(ctx.destination);
    src.onended = () => this.sources.delete(src);
    this.sources.add(src);
    src.start(Math.max(when, ctx.currentTime));
    return src;
  }

  /** Play one clip now; returns its AudioBufferSourceNode (onended tells when it stops). */
  play(pcm, rate = RATE) {
    this.stop();
    return this.schedule(pcm, rate, 0);
  }

  stop() {
    for (const src of this.sources) {
      try {
        src.stop();
      } catch {
        /* not started yet */
      }
    }
    this.sources.clear();
  }
}
