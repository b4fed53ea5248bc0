// AudioWorkletProcessor: microphone (any rate, any channels) -> 16 kHz mono
// PCM16, posted as 20 ms frames (320 samples, 640 bytes, transferred).
//
// Resampling: a moving average of ~(inRate / 16000) samples as the low-pass
// (for 48 kHz that is exactly averaging groups of 3), then a linear
// interpolating read at a step of inRate / 16000 input samples.

const TARGET_RATE = 16000;
const FRAME = 320;

class MicProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / TARGET_RATE;
    this.width = this.step > 1 ? Math.max(1, Math.round(this.step)) : 1;
    this.hist = new Float32Array(this.width);
    this.hi = 0;
    this.filtered = new Float32Array(128);
    this.prev = 0; // last filtered sample of the previous block
    this.pos = 0; // next output position, in input samples from this block's start
    this.frame = new Int16Array(FRAME);
    this.n = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0 || !input[0]) return true;
    const len = input[0].length;
    if (this.filtered.length < len) this.filtered = new Float32Array(len);
    const f = this.filtered;
    const chans = input.length;
    const w = this.width;
    for (let i = 0; i < len; i++) {
      let x = 0;
      for (let c = 0; c < chans; c++) x += input[c][i];
      this.hist[this.hi] = x / chans;
      this.hi = (this.hi + 1) % w;
      let sum = 0;
      for (let k = 0; k < w; k++) sum += this.hist[k];
      f[i] = sum / w;
    }
    while (this.pos <= len - 1) {
      const i0 = Math.floor(this.pos);
      const t = this.pos - i0;
      const a = i0 < 0 ? this.prev : f[i0];
      const b = i0 + 1 < len ? f[i0 + 1] : a;
      this.push(a + (b - a) * t);
      this.pos += this.step;
    }
    this.pos -= len;
    this.prev = f[len - 1];
    return true;
  }

  push(x) {
    const s = Math.max(-1, Math.min(1, x));
    this.frame[this.n++] = s < 0 ? Math.round(s * 32768) : Math.round(s * 32767);
    if (this.n === FRAME) {
      this.port.postMessage(this.frame.buffer, [this.frame.buffer]);
      this.frame = new Int16Array(FRAME);
      this.n = 0;
    }
  }
}

registerProcessor("mic-pcm16", MicProcessor);
