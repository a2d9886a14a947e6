// Pure audio helpers of the page (no DOM): decimation to 16 kHz, PCM16 packing, levels.
// Loaded by index.html before app.js; tests/test_server.py runs them under node when it is installed.
"use strict";

// Box-filter decimator: averages the input samples that fall in each output period (a low-pass against
// aliasing), keeping the fractional phase across blocks so no sample is lost or repeated.
class Downsampler {
  constructor(inputRate, outputRate) {
    if (!(inputRate >= outputRate)) throw new Error(`cannot downsample ${inputRate} Hz to ${outputRate} Hz`);
    this.step = inputRate / outputRate;
    this.phase = 0; this.sum = 0; this.count = 0;
  }
  process(block) {
    const out = [];
    for (const x of block) {
      this.sum += x; this.count += 1; this.phase += 1;
      if (this.phase >= this.step) {
        out.push(this.sum / this.count);
        this.sum = 0; this.count = 0; this.phase -= this.step;
      }
    }
    return out;
  }
}

// Float samples -> little-endian PCM16 (an ArrayBuffer), clipped to full scale (no wrap-around).
function toPcm16(samples) {
  const view = new DataView(new ArrayBuffer(samples.length * 2));
  for (let i = 0; i < samples.length; i++) {
    const x = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(2 * i, Math.round(x * 32767), true);
  }
  return view.buffer;
}

// RMS level in dB relative to full scale, as the server's energy gate measures it.
function dbfs(samples) {
  let sum = 0;
  for (const x of samples) sum += x * x;
  const rms = Math.sqrt(sum / Math.max(1, samples.length));
  return rms > 0 ? 20 * Math.log10(rms) : -Infinity;
}

if (typeof module !== "undefined") module.exports = { Downsampler, toPcm16, dbfs };
