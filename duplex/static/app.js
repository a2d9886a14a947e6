// Microphone -> 16 kHz PCM16 over a WebSocket (protocol: docs/server.md) -> two-column timeline.
"use strict";

const TARGET_RATE = 16000;
const SEND_EVERY_SAMPLES = 1600; // 100 ms per binary frame
const STATE_NAMES = { "<|endofuser|>": "respond", "<|incomplete|>": "incomplete", "<|ignore|>": "ignore" };

const $ = (id) => document.getElementById(id);
let call = null; // the running conversation: {ws, context, stream, ...}; null when idle

// Box-filter decimator: averages the input samples that fall in each output period (a low-pass against
// aliasing), keeping the fractional phase across blocks so no sample is lost or repeated.
class Downsampler {
  constructor(inputRate, outputRate) {
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

// Float samples -> little-endian PCM16, clipped to full scale (no wrap-around).
function toPcm16(samples) {
  const pcm = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) {
    const x = Math.max(-1, Math.min(1, samples[i]));
    pcm[i] = Math.round(x * 32767);
  }
  return pcm.buffer;
}

function dbfs(samples) {
  let sum = 0;
  for (const x of samples) sum += x * x;
  const rms = Math.sqrt(sum / Math.max(1, samples.length));
  return rms > 0 ? 20 * Math.log10(rms) : -Infinity;
}

function setStatus(text) { $("status").textContent = text; }
function showError(text) { $("error").textContent = text; }

async function start() {
  showError("");
  $("timeline").replaceChildren();
  $("conversation").textContent = "(appears when you press Stop)";
  $("start").disabled = true;
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
  } catch (error) {
    showError(`No microphone: ${error.message}. Browsers allow it only on https pages or localhost.`);
    $("start").disabled = false;
    return;
  }
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  call = { ws, stream, context: null, pending: [], sentSamples: 0 };
  ws.onmessage = (message) => onFrame(JSON.parse(message.data));
  ws.onclose = (event) => onClosed(event);
  ws.onopen = () => ws.send(JSON.stringify({ type: "start", sample_rate: TARGET_RATE }));
}

async function startAudio(current) {
  const context = new AudioContext();
  current.context = context;
  await context.audioWorklet.addModule("/static/capture-worklet.js");
  const source = context.createMediaStreamSource(current.stream);
  const capture = new AudioWorkletNode(context, "capture-processor");
  const downsampler = new Downsampler(context.sampleRate, TARGET_RATE);
  capture.port.onmessage = (message) => onSamples(current, downsampler.process(message.data));
  source.connect(capture);
  $("stop").disabled = false;
  setStatus(`Listening (microphone at ${context.sampleRate} Hz, sent at ${TARGET_RATE} Hz).`);
}

function onSamples(current, samples) {
  if (current.ws.readyState !== WebSocket.OPEN || current.stopped) return;
  current.pending.push(...samples);
  if (current.pending.length < SEND_EVERY_SAMPLES) return;
  const level = dbfs(current.pending);
  $("level").value = Math.max(-80, level);
  $("dbfs").textContent = `${level.toFixed(0)} dBFS`;
  current.ws.send(toPcm16(current.pending));
  current.sentSamples += current.pending.length;
  current.pending = [];
}

function onFrame(frame) {
  if (frame.type === "ready") {
    $("level").low = frame.silence_threshold_dbfs;
    startAudio(call).catch((error) => { showError(`Audio capture failed: ${error.message}`); stop(); });
  } else if (frame.type === "slice") {
    addRow(frame);
    const behind = call ? call.sentSamples / TARGET_RATE - (frame.start_s + frame.duration_s) : 0;
    if (frame.input !== "final" && call && !call.stopped) {
      setStatus(`Listening; the model is ${Math.max(0, behind).toFixed(1)} s behind your voice.`);
    }
  } else if (frame.type === "conversation") {
    $("conversation").textContent = frame.text || "(nothing was said)";
  } else if (frame.type === "error") {
    showError(frame.message);
  }
}

function addRow(event) {
  const row = document.createElement("tr");
  const cell = (cls, text) => {
    const td = document.createElement("td");
    td.className = cls;
    if (text !== undefined) td.textContent = text;
    row.appendChild(td);
    return td;
  };
  cell("n", String(event.slice_index));
  cell("t", `${event.start_s.toFixed(1)} s`);
  let user;
  if (event.input === "speech") {
    const state = event.state_token === null ? "" : `[${STATE_NAMES[event.state_token] || event.state_token}] `;
    user = `speech ${state}(${event.speech_positions} pos)`;
  } else {
    user = event.input === "silence" ? "(silence)" : "(end of input)";
  }
  const userCell = cell("u", user);
  if (event.input === "silence") userCell.classList.add("silence");
  const said = cell("a");
  for (const change of event.changes) {
    const tag = document.createElement("span");
    tag.className = "tag";
    tag.textContent = change;
    said.appendChild(tag);
  }
  said.appendChild(document.createTextNode(event.text));
  $("timeline").appendChild(row);
  row.scrollIntoView({ block: "nearest" });
}

function stop() {
  if (!call || call.stopped) return;
  call.stopped = true;
  $("stop").disabled = true;
  call.stream.getTracks().forEach((track) => track.stop());
  if (call.context) call.context.close();
  if (call.ws.readyState === WebSocket.OPEN) {
    if (call.pending.length) call.ws.send(toPcm16(call.pending));
    call.ws.send(JSON.stringify({ type: "end" }));
    setStatus("Finishing the reply...");
  }
}

function onClosed(event) {
  if (call && !call.stopped) stop();
  call = null;
  $("start").disabled = false;
  $("stop").disabled = true;
  setStatus(`Disconnected${event.code === 1000 ? "" : ` (code ${event.code})`}. Press Start for a new conversation.`);
}

$("start").onclick = start;
$("stop").onclick = stop;
