// rtvc AudioWorklet: hands microphone render quanta to the page, plays converted audio from a bounded ring.
class RtvcProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ring = new Float32Array(sampleRate * 2);  // 2 s capacity
    this.r = 0; this.w = 0; this.underruns = 0; this.skipped = 0;
    this.maxQueued = Math.round(sampleRate * 0.08);  // bounded delay: never more than 80 ms queued
    this.target = Math.round(sampleRate * 0.02);     // after a skip, keep a 20 ms cushion
    this.port.onmessage = (e) => {
      const x = e.data;
      for (let i = 0; i < x.length; i++) { this.ring[this.w % this.ring.length] = x[i]; this.w++; }
      if (this.w - this.r > this.maxQueued) { this.skipped += this.w - this.target - this.r; this.r = this.w - this.target; }
    };
  }
  process(inputs, outputs) {
    const mic = inputs[0] && inputs[0][0];
    if (mic) this.port.postMessage(mic.slice(0));
    const out = outputs[0][0];
    for (let i = 0; i < out.length; i++) {
      if (this.r < this.w) { out[i] = this.ring[this.r % this.ring.length]; this.r++; }
      else { out[i] = 0; this.underruns++; }
    }
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    return true;
  }
}
registerProcessor('rtvc', RtvcProcessor);
