// Microphone -> 16 kHz PCM16 over a WebSocket (protocol: docs/server.md) -> two-column timeline.
// Needs audio.js (Downsampler, toPcm16, dbfs) loaded first.
"use strict";

const TARGET_RATE = 16000;
const STATE_NAMES = { "<|endofuser|>": "respond", "<|incomplete|>": "incomplete", "<|ignore|>": "ignore" };

const LEVEL_FLOOR = -80; // dBFS: the meter's bottom; quieter input (digital silence: -Infinity) shows as below it
const $ = (id) => document.getElementById(id);
let call = null; // the running conversation: {ws, context, stream, ...}; null when idle
// The conversation across reconnects (docs/server.md, "Reconnecting"): the ready frame's token, kept after a
// connection is lost so Reconnect continues the same conversation (dropped when it ends or the server refuses
// it); the last slice shown; and the audio sent but not yet acknowledged (covered by no slice frame), re-sent
// from the server's received_samples after a resume. Sample counts are at the declared (sent) rate.
let resumeToken = null;
let lastSliceShown = -1;
let unacked = { from: 0, samples: [] }; // samples[0] is sample number `from` of the conversation

function setStatus(text) { $("status").textContent = text; }
function showError(text) { $("error").textContent = text; }

// Start a new conversation, or (resume = true) reconnect to the one of resumeToken, keeping the timeline.
async function start(resume = false) {
  showError("");
  if (!resume) {
    resumeToken = null;
    lastSliceShown = -1;
    unacked = { from: 0, samples: [] };
    $("timeline").replaceChildren();
    $("conversation").textContent = "(appears when you press Stop)";
  }
  $("start").disabled = true;
  $("reconnect").hidden = true;
  const context = new AudioContext(); // made during the click: browsers only start audio on a user gesture
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
  } catch (error) {
    showError(`No microphone: ${error.message}. Browsers allow it only on https pages or localhost.`);
    $("start").disabled = false;
    $("reconnect").hidden = resumeToken === null;
    context.close();
    return;
  }
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const query = resume ? `?resume=${encodeURIComponent(resumeToken)}&last_slice=${lastSliceShown}` : "";
  const ws = new WebSocket(`${scheme}//${location.host}/ws${query}`);
  ws.binaryType = "arraybuffer";
  // 16 kHz, or the device's own rate when lower (the server resamples what the start frame declares)
  const sendRate = Math.min(context.sampleRate, TARGET_RATE);
  call = { ws, stream, context, sendRate, pending: [], sentSamples: 0, stopped: false, resuming: resume };
  ws.onmessage = (message) => onFrame(JSON.parse(message.data));
  ws.onclose = (event) => onClosed(event);
  if (!resume) ws.onopen = () => ws.send(JSON.stringify({ type: "start", sample_rate: sendRate }));
}

// After a resume: the declared rate stays the first connection's; send again what the server has not received.
function resumeAudio(current, frame) {
  current.sendRate = frame.client_sample_rate || current.sendRate;
  const from = Math.max(frame.received_samples, unacked.from);
  const again = unacked.samples.slice(from - unacked.from);
  if (again.length) current.ws.send(toPcm16(again));
  current.sentSamples = from + again.length;
}

// A slice frame acknowledges the audio it covers: forget it.
function acknowledge(current, frame) {
  const covered = Math.round((frame.start_s + frame.duration_s) * current.sendRate);
  if (covered > unacked.from) {
    unacked.samples = unacked.samples.slice(covered - unacked.from);
    unacked.from = covered;
  }
}

async function startAudio(current) {
  const context = current.context;
  await context.resume();
  await context.audioWorklet.addModule("/static/capture-worklet.js");
  const source = context.createMediaStreamSource(current.stream);
  const capture = new AudioWorkletNode(context, "capture-processor");
  const downsampler = new Downsampler(context.sampleRate, current.sendRate);
  capture.port.onmessage = (message) => onSamples(current, downsampler.process(message.data));
  source.connect(capture);
  $("stop").disabled = false;
  setStatus(`Listening (microphone at ${context.sampleRate} Hz, sent at ${current.sendRate} Hz).`);
}

function onSamples(current, samples) {
  if (current.ws.readyState !== WebSocket.OPEN || current.stopped) return;
  current.pending.push(...samples);
  if (current.pending.length < current.sendRate / 10) return; // 100 ms per binary frame
  showLevel(dbfs(current.pending));
  current.ws.send(toPcm16(current.pending));
  current.sentSamples += current.pending.length;
  for (const x of current.pending) unacked.samples.push(x);
  current.pending = [];
}

// The meter and its number; null = no input (idle, stopped). Levels below the floor (digital silence is
// -Infinity, denormal samples give values like -728) show as "below -80 dBFS", not as a number.
function showLevel(level) {
  $("level").value = level === null ? LEVEL_FLOOR : Math.max(LEVEL_FLOOR, level);
  if (level === null) $("dbfs").textContent = "";
  else $("dbfs").textContent = level > LEVEL_FLOOR ? `${level.toFixed(0)} dBFS` : `below ${LEVEL_FLOOR} dBFS`;
}

function onFrame(frame) {
  if (frame.type === "ready") {
    $("level").low = frame.silence_threshold_dbfs;
    call.ready = true;
    if (frame.token) resumeToken = frame.token;
    if (frame.resumed) resumeAudio(call, frame);
    startAudio(call).catch((error) => { showError(`Audio capture failed: ${error.message}`); stop(); });
  } else if (frame.type === "slice") {
    if (frame.slice_index <= lastSliceShown) return; // shown before the connection dropped
    lastSliceShown = frame.slice_index;
    if (call && frame.input !== "final") acknowledge(call, frame);
    addRow(frame);
    const behind = call ? call.sentSamples / call.sendRate - (frame.start_s + frame.duration_s) : 0;
    if (frame.input !== "final" && call && !call.stopped) {
      setStatus(`Listening; the model is ${Math.max(0, behind).toFixed(1)} s behind your voice.`);
    }
  } else if (frame.type === "conversation") {
    $("conversation").textContent = frame.text || "(nothing was said)";
    resumeToken = null; // the conversation is over
  } else if (frame.type === "error") {
    showError(frame.message);
    if (call && call.resuming && !call.ready) resumeToken = null; // token unknown or expired: only Start is left
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
  showLevel(null); // the microphone is off
  call.stream.getTracks().forEach((track) => track.stop());
  call.context.close();
  if (call.ws.readyState === WebSocket.OPEN) {
    if (call.pending.length) call.ws.send(toPcm16(call.pending));
    call.ws.send(JSON.stringify({ type: "end" }));
    setStatus("Finishing the reply...");
  }
}

function onClosed(event) {
  if (call && call.resuming && !call.ready) resumeToken = null; // the resume was refused (4001): only Start is left
  const lost = call && !call.stopped && event.code !== 1000; // not ended by Stop or by the server
  if (call && !call.stopped) stop();
  call = null;
  $("start").disabled = false;
  $("stop").disabled = true;
  if (lost && resumeToken !== null) {
    $("reconnect").hidden = false;
    setStatus(`Connection lost (code ${event.code}). Press Reconnect to continue this conversation, ` +
              "or Start for a new one.");
    return;
  }
  resumeToken = null;
  $("reconnect").hidden = true;
  setStatus(`Disconnected${event.code === 1000 ? "" : ` (code ${event.code})`}. Press Start for a new conversation.`);
}

$("start").onclick = () => start(false);
$("reconnect").onclick = () => start(true);
$("stop").onclick = stop;
