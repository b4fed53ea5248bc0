// AudioWorkletProcessor: plays a spoken reply's PCM16 mono frames (the
// WebSocket path) as they come. The page posts
//   {type: "pcm", pcm: ArrayBuffer, rate}  a frame at `rate` Hz (resampled
//                                          here, linearly, when it is not the
//                                          context's rate);
//   {type: "clear"}                        drop everything queued, at once;
// and gets {played, queued, dropped} (samples at the context's rate) about
// every 50 ms while something plays, and at once after a clear.
// Bounded: at most MAX_SECONDS queued; beyond it new frames are dropped
// (counted), never the audio already playing.

const MAX_SECONDS = 120;

class ReplyPlayer extends AudioWorkletProcessor {
  constructor() {
    super();
    this.chunks = []; // Float32Array at sampleRate
    this.head = 0; // read position in chunks[0]
    this.queued = 0;
    this.played = 0;
    this.dropped = 0;
    this.max = MAX_SECONDS * sampleRate;
    this.sinceReport = 0;
    this.resetResampler(sampleRate);
    this.port.onmessage = (ev) => this.onMessage(ev.data);
  }

  resetResampler(rate) {
    this.rate = rate;
    this.step = rate / sampleRate; // input samples per output sample
    this.pos = 0; // next output position, in input samples from the chunk's start
    this.prev = 0; // last input sample of the previous chunk
  }

  onMessage(msg) {
    if (!msg) return;
    if (msg.type === "clear") {
      this.chunks = [];
      this.head = 0;
      this.queued = 0;
      this.resetResampler(this.rate);
      this.report();
    } else if (msg.type === "pcm") {
      const pcm = new Int16Array(msg.pcm);
      if (msg.rate !== this.rate) this.resetResampler(msg.rate);
      const out = this.convert(pcm);
      if (this.queued + out.length > this.max) {
        this.dropped += out.length;
        return;
      }
      if (out.length) {
        this.chunks.push(out);
        this.queued += out.length;
      }
    }
  }

  convert(pcm) {
    if (this.step === 1) {
      const out = new Float32Array(pcm.length);
      for (let i = 0; i < pcm.length; i++) out[i] = pcm[i] / 32768;
      return out;
    }
    const len = pcm.length;
    const out = [];
    while (this.pos <= len - 1) {
      const i0 = Math.floor(this.pos);
      const t = this.pos - i0;
      const a = i0 < 0 ? this.prev : pcm[i0] / 32768;
      const b = i0 + 1 < len ? pcm[i0 + 1] / 32768 : a;
      out.push(a + (b - a) * t);
      this.pos += this.step;
    }
    this.pos -= len;
    if (len) this.prev = pcm[len - 1] / 32768;
    return Float32Array.from(out);
  }

  report() {
    this.sinceReport = 0;
    this.port.postMessage({ played: this.played, queued: this.queued, dropped: this.dropped });
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    let n = 0;
    while (n < out.length && this.chunks.length) {
      const chunk = this.chunks[0];
      const take = Math.min(out.length - n, chunk.length - this.head);
      out.set(chunk.subarray(this.head, this.head + take), n);
      n += take;
      this.head += take;
      if (this.head >= chunk.length) {
        this.chunks.shift();
        this.head = 0;
      }
    }
    if (n < out.length) out.fill(0, n);
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    if (n) {
      this.played += n;
      this.queued -= n;
      this.sinceReport += out.length;
      if (this.sinceReport >= sampleRate / 20 || !this.queued) this.report();
    }
    return true;
  }
}

registerProcessor("reply-pcm16", ReplyPlayer);
