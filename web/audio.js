// Audio in and out for the page: microphone capture (16 kHz PCM16 frames from
// mic-worklet.js), the input transports (WebSocket PCM now; a WebRTC one goes
// beside it in TRANSPORTS), a recorder of what was sent, and PCM playback.

export const RATE = 16000;

/** Open the microphone; calls onFrame(ArrayBuffer of 320 PCM16 samples) every 20 ms. */
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
  }

  async start() {
    this.mic = await openMic((buffer) => {
      const pcm = new Int16Array(buffer);
      this.level = Math.max(frameLevel(pcm), this.level * 0.8);
      if (this.client.sendAudio(buffer)) this.onSent(pcm);
    });
  }

  stop() {
    if (this.mic) this.mic.stop();
    this.mic = null;
    this.level = 0;
  }
}

const TRANSPORTS = { ws: WsPcmInput };

/** The audio input for ?transport=NAME; onSent(Int16Array) sees each frame that went out. */
export function createAudioInput(kind, client, onSent) {
  const Input = TRANSPORTS[kind] || TRANSPORTS.ws;
  return new Input(client, onSent);
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

/** Plays PCM16 mono: whole clips, and a reply's streamed speech chunk by chunk. */
export class Player {
  constructor() {
    this.ctx = null;
    this.sources = new Set();
    this.at = 0;
    this.rate = RATE;
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

  /** Streamed reply speech: begin(rate) then push(ArrayBuffer) per binary frame. */
  begin(rate) {
    this.stop();
    this.rate = rate || RATE;
    this.at = this.context().currentTime + 0.05;
  }

  push(buffer) {
    if (buffer.byteLength < 2) return;
    const pcm = new Int16Array(buffer, 0, buffer.byteLength >> 1);
    const ctx = this.context();
    this.at = Math.max(this.at, ctx.currentTime + 0.02);
    this.schedule(pcm, this.rate, this.at);
    this.at += pcm.length / this.rate;
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
