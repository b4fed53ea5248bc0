// The page: wires the realtime client and the audio input to the DOM
// (talk button, live state, level meter, conversation, typed turns) and plays
// the spoken replies (reply-audio.js), with a mute toggle.

import { RealtimeClient, realtimeUrl } from "./protocol.js";
import { ServerStatus, readyzUrl } from "./server-status.js";
import { createAudioInput, iceServersFrom, Recorder, Player } from "./audio.js";
import { ReplyAudio, storedMuted, storeMuted } from "./reply-audio.js";
import { Continuation } from "./continuation.js";

const params = new URLSearchParams(window.location.search);
const byId = (id) => document.querySelector(`[data-testid="${id}"]`);
const ui = {
  talk: byId("talk-button"),
  state: byId("state"),
  meter: byId("level-meter"),
  conv: byId("conversation"),
  form: byId("text-form"),
  text: byId("text-input"),
  banner: byId("demo-banner"),
  serverStatus: byId("server-status"),
  conn: byId("connection"),
  errors: byId("errors"),
  transport: byId("transport"),
  sessionId: byId("session-id"),
  mute: byId("mute-button"),
  replyAudio: byId("reply-audio"),
};

const SESSION_KEY = "voice_agent.session_id";
const TRANSCRIPT_KEY = "voice_agent.transcript";
const TRANSPORT = params.get("transport") === "ws" ? "ws" : "webrtc";

// ?bench=1: performance.now() marks of what the page received and rendered,
// read by benchmarks/browser.py.
const marks = params.get("bench") === "1" ? (window.__voiceAgentMarks = []) : null;
function mark(type, fields) {
  if (marks) marks.push({ type, t: performance.now(), ...fields });
}

function storedSessionId() {
  try {
    return window.sessionStorage.getItem(SESSION_KEY);
  } catch {
    return null; // storage disabled
  }
}

function storeSessionId(id) {
  try {
    window.sessionStorage.setItem(SESSION_KEY, id);
  } catch {
    /* storage disabled: a reload starts a new conversation */
  }
}

// What the conversation showed, kept in sessionStorage so that a reload that
// resumes the same session shows its earlier turns again (text, durations,
// cut-off marks; not the recorded audio).
const transcript = { sessionId: null, turns: [] };
const continuation = new Continuation(ui.conv, transcript);

function loadTranscript() {
  try {
    const saved = JSON.parse(window.sessionStorage.getItem(TRANSCRIPT_KEY) || "null");
    if (saved && typeof saved.sessionId === "string" && Array.isArray(saved.turns)) return saved;
  } catch {
    /* storage disabled or garbage */
  }
  return null;
}

const KEEP_TURNS = 200; // shown again after a reload, at most

function saveTranscript() {
  if (transcript.turns.length > KEEP_TURNS) transcript.turns.splice(0, transcript.turns.length - KEEP_TURNS);
  try {
    window.sessionStorage.setItem(TRANSCRIPT_KEY, JSON.stringify(transcript));
  } catch {
    /* storage disabled or full: a reload shows only new turns */
  }
}

const start = { device: params.get("device") || "browser" };
// The access token (--token) comes from the URL fragment (#token=...), which
// the browser never sends to the server in a request line or log.
const fragment = new URLSearchParams(window.location.hash.slice(1));
if (fragment.get("token")) start.token = fragment.get("token");
// Spoken replies unless muted (remembered) or ?speak=0; toggling the mute
// silences the page at once and tells the server (session.update), which stops
// synthesizing; the next session.start asks for what the toggle says.
let muted = params.get("speak") === "0" || storedMuted();
start.speak = !muted;

const client = new RealtimeClient(realtimeUrl(params), start);
// "The model is loading (N s so far)" versus "at its session limit" (both close 1013).
const serverStatus = new ServerStatus(ui.serverStatus, {
  readyz: readyzUrl(client.url),
  onReady: () => client.connect(),
});
client.sessionId = storedSessionId(); // a reload resumes the conversation
const recorder = new Recorder();
const player = new Player(); // plays back recorded utterances
const replyAudio = new ReplyAudio(ui.replyAudio, { muted });
let input = null; // the audio input while the mic is on
let starting = null; // the audio input being started (negotiating)
let speaking = false; // between speech.started and speech.stopped
const userTurns = new Map(); // utterance_id -> element
const replies = new Map(); // reply_id -> { el, body, text }

// ---------------------------------------------------------------- state

function setState(s) {
  ui.state.textContent = s;
  ui.state.dataset.state = s;
  document.body.dataset.state = s;
}

function showTransport(name) {
  ui.transport.textContent = name;
  ui.transport.dataset.transport = name;
  ui.transport.title = name === "off" ? "microphone off" : `microphone audio goes over ${name === "ws" ? "the WebSocket" : "WebRTC"}`;
}

/** The input that server events about audio transport go to. */
function audioInput() {
  return starting || input;
}

function restingState() {
  return speaking ? "speech" : input ? "listening" : "idle";
}

// ---------------------------------------------------------------- conversation

function nearBottom() {
  return ui.conv.scrollHeight - ui.conv.scrollTop - ui.conv.clientHeight < 120;
}

function addTurn(kind, who, entry = { kind }) {
  const follow = nearBottom();
  const li = document.createElement("li");
  li.className = `turn ${kind}`;
  li.dataset.testid = `turn-${kind}`;
  const head = document.createElement("div");
  head.className = "head";
  const name = document.createElement("span");
  name.className = "who";
  name.textContent = who;
  const meta = document.createElement("span");
  meta.className = "meta";
  head.append(name, meta);
  const body = document.createElement("p");
  body.className = "body";
  li.append(head, body);
  ui.conv.append(li);
  if (follow) ui.conv.scrollTop = ui.conv.scrollHeight;
  transcript.turns.push(entry);
  return { li, meta, body, entry };
}

const WHO = { user: "You", assistant: "Assistant", command: "Command" };

/** Show the turns of an earlier page of this session (after a reload). */
function restoreTurns(turns) {
  for (const e of turns) {
    if (!e || !WHO[e.kind]) continue;
    if (e.kind === "user" && e.durationMs == null && !e.text) continue; // cut short by the reload
    const t = addTurn(e.kind, WHO[e.kind], e);
    t.li.dataset.restored = "true";
    if (e.kind === "user" && e.durationMs != null) {
      t.li.dataset.durationMs = String(e.durationMs);
      t.meta.textContent = `${(e.durationMs / 1000).toFixed(1)} s`;
      t.body.textContent = "Spoken (the recording is not kept across reloads)";
    } else if (e.kind === "assistant") {
      if (e.replyId) t.li.dataset.replyId = e.replyId;
      t.body.textContent = e.text || "";
      if (e.cancelled) markCutOff(t, e.reason);
      else if (e.done) t.li.dataset.done = "true";
      else t.meta.textContent = "interrupted by the reload";
    } else {
      t.body.textContent = e.text || "";
    }
  }
}

function markCutOff(t, reason) {
  t.li.classList.add("cancelled");
  t.li.dataset.cancelled = "true";
  t.li.dataset.reason = reason || "client";
  t.meta.textContent = "";
  const label = document.createElement("span");
  label.className = "cut-label";
  label.textContent = reason === "barge_in" ? "cut off (you spoke)" : "cut off";
  t.meta.append(label);
}

/** A note across the conversation (e.g. the server started a new one). */
function addNote(text) {
  const li = document.createElement("li");
  li.className = "note";
  li.dataset.testid = "note";
  li.textContent = text;
  ui.conv.append(li);
}


function playButton(pcm, seconds) {
  const btn = document.createElement("button");
  btn.type = "button";
  btn.className = "play";
  btn.textContent = "▶ Play utterance";
  btn.setAttribute("aria-label", `Play back this utterance (${seconds} seconds)`);
  btn.addEventListener("click", () => {
    const src = player.play(pcm);
    btn.textContent = "■ Playing";
    src.addEventListener("ended", () => (btn.textContent = "▶ Play utterance"));
  });
  return btn;
}

function replyTurn(id) {
  let r = replies.get(id);
  if (!r) {
    const t = addTurn("assistant", "Assistant", { kind: "assistant", replyId: id, text: "" });
    r = { ...t, text: "", got: false, deltas: 0 };
    t.li.dataset.replyId = id;
    t.li.dataset.deltas = "0";
    t.li.setAttribute("aria-busy", "true"); // read out once complete
    replies.set(id, r);
  }
  return r;
}

// ---------------------------------------------------------------- errors

function showError(message) {
  const div = document.createElement("div");
  div.className = "error";
  div.textContent = message;
  ui.errors.append(div);
  while (ui.errors.childElementCount > 3) ui.errors.firstElementChild.remove();
  setTimeout(() => div.remove(), 8000);
}

// ---------------------------------------------------------------- server events

client.on("connection", ({ state, delay }) => {
  ui.conn.dataset.state = state;
  ui.conn.textContent = state === "reconnecting" && delay ? `reconnecting in ${Math.ceil(delay / 1000)} s` : state;
});

client.on("close", ({ code, reason }) => {
  speaking = false;
  const mic = audioInput();
  if (mic) mic.suspend();
  player.stop();
  replyAudio.stop();
  setState(restingState());
  if (code === 1008) showError(`The server refused the connection: ${reason || "token or origin not allowed"}.`);
  if (code === 1013) serverStatus.refused(reason);
  else serverStatus.clear();
});

client.on("session.started", (msg) => {
  mark("session.started", { session_id: msg.session_id });
  serverStatus.clear();
  recorder.reset(); // stream positions count from this session's first sample
  if (msg.session_id && msg.session_id !== transcript.sessionId) {
    // A new conversation (first load, or the server no longer had ours).
    if (transcript.turns.length) addNote("The server started a new conversation: it does not remember the turns above.");
    transcript.sessionId = msg.session_id;
    transcript.turns = [];
    saveTranscript();
  }
  if (msg.session_id) {
    storeSessionId(msg.session_id);
    document.body.dataset.sessionId = msg.session_id;
    ui.sessionId.textContent = msg.session_id.slice(0, 8);
    ui.sessionId.dataset.sessionId = msg.session_id;
    ui.sessionId.title = `session ${msg.session_id}`;
  }
  const mic = audioInput();
  if (mic) mic.renegotiate(); // a re-opened socket: WebRTC is negotiated again
  ui.banner.hidden = msg.demo_model !== true;
  ui.conn.title = msg.model ? `model: ${msg.model}` : "";
});

client.on("speech.started", (msg) => {
  speaking = true;
  replyAudio.stop(); // the user speaks over the reply: silence it now
  const t = addTurn("user", "You");
  t.meta.textContent = "speaking…";
  t.body.textContent = "Speaking…";
  userTurns.set(msg.utterance_id, t);
  setState("speech");
});

client.on("speech.stopped", (msg) => {
  mark("speech.stopped", { utterance_id: msg.utterance_id });
  speaking = false;
  const t = userTurns.get(msg.utterance_id) || addTurn("user", "You");
  userTurns.delete(msg.utterance_id);
  const start = continuation.stopped(msg, t); // the first part's start when it continues one
  const ms = Math.max(0, msg.end_ms - start);
  const seconds = (ms / 1000).toFixed(1);
  t.meta.textContent = `${seconds} s`;
  t.li.dataset.durationMs = String(ms);
  t.entry.durationMs = ms;
  saveTranscript();
  const pcm = recorder.cut(start, msg.end_ms);
  t.body.textContent = pcm ? "" : "Spoken (audio not kept)";
  if (pcm) t.body.append(playButton(pcm, seconds));
  setState("thinking");
});

client.on("reply.started", (msg) => {
  mark("reply.started", { reply_id: msg.reply_id, utterance_id: msg.utterance_id });
  replyTurn(msg.reply_id).meta.textContent = "thinking…";
  setState("thinking");
});

client.on("reply.delta", (msg) => {
  const r = replyTurn(msg.reply_id);
  if (!r.got) {
    r.got = true;
    r.meta.textContent = "";
    setState("replying");
  }
  const follow = nearBottom();
  const first = !r.text && Boolean(msg.text);
  r.text += msg.text || "";
  r.entry.text = r.text;
  r.body.textContent = r.text;
  r.li.dataset.deltas = String(++r.deltas);
  if (follow) ui.conv.scrollTop = ui.conv.scrollHeight;
  if (first) mark("reply.delta.first", { reply_id: msg.reply_id });
});

client.on("reply.done", (msg) => {
  mark("reply.done", { reply_id: msg.reply_id });
  const r = replyTurn(msg.reply_id);
  r.text = typeof msg.text === "string" ? msg.text : r.text;
  r.body.textContent = r.text;
  const timing = msg.timing || {};
  r.meta.textContent = timing.ttft_ms != null ? `first words after ${Math.round(timing.ttft_ms)} ms` : "";
  r.li.dataset.done = "true";
  r.li.setAttribute("aria-busy", "false");
  r.entry.text = r.text;
  r.entry.done = true;
  saveTranscript();
  replies.delete(msg.reply_id);
  setState(restingState());
});

client.on("reply.cancelled", (msg) => {
  if (msg.reason === "continued") {
    continuation.takeBack(msg.reply_id);
    replies.delete(msg.reply_id);
    replyAudio.stop();
    saveTranscript();
    return setState(restingState());
  }
  const r = replyTurn(msg.reply_id);
  if (typeof msg.text === "string") r.text = msg.text;
  r.body.textContent = r.text || "(nothing said yet)";
  markCutOff(r, msg.reason);
  r.li.setAttribute("aria-busy", "false");
  Object.assign(r.entry, { text: r.text, cancelled: true, reason: msg.reason || "client" });
  saveTranscript();
  replies.delete(msg.reply_id);
  replyAudio.stop();
  setState(restingState());
});

client.on("command", (msg) => {
  const t = addTurn("command", "Command");
  t.body.textContent = `${msg.action} ${msg.target}${msg.value != null ? ` = ${msg.value}` : ""}`;
  t.entry.text = t.body.textContent;
  saveTranscript();
});

client.on("reply.audio.started", (msg) => {
  mark("reply.audio.started", { reply_id: msg.reply_id });
  replyAudio.begin(msg.reply_id, msg.sample_rate);
});
client.on("reply.audio.done", (msg) => replyAudio.end(msg.reply_id, msg.cancelled === true));
client.on("audio", (buffer) => replyAudio.push(buffer));

client.on("webrtc.answer", (msg) => {
  const mic = audioInput();
  if (mic) mic.onAnswer(msg);
});

client.on("error", (msg) => {
  const mic = audioInput();
  if (mic && mic.onServerError(msg)) return; // the WebRTC offer was refused: WS PCM instead
  showError(`${msg.code || "error"}: ${msg.message || "something went wrong"}`);
});

// ---------------------------------------------------------------- controls

async function startMic() {
  mark("mic.start");
  ui.talk.disabled = true;
  const candidate = createAudioInput(TRANSPORT, client, (pcm) => recorder.append(pcm), {
    iceServers: iceServersFrom(params.get("ice")),
    onRemoteAudio: (stream) => replyAudio.attachTrack(stream),
  });
  candidate.onchange = showTransport;
  starting = candidate;
  try {
    await candidate.start();
    input = candidate;
    mark("mic.ready", { transport: candidate.name });
    showTransport(candidate.name);
    ui.talk.textContent = "Stop";
    ui.talk.setAttribute("aria-pressed", "true");
    if (ui.state.dataset.state === "idle") setState("listening");
  } catch (err) {
    const denied = err && (err.name === "NotAllowedError" || err.name === "SecurityError");
    showError(denied ? "Microphone permission was denied." : `Could not start the microphone: ${err.message || err}`);
    candidate.stop();
  } finally {
    starting = null;
    ui.talk.disabled = false;
  }
}

function stopMic() {
  if (speaking) client.send({ type: "audio.commit" }); // close the utterance now
  input.stop();
  input = null;
  showTransport("off");
  ui.meter.value = 0;
  ui.talk.textContent = "Start";
  ui.talk.setAttribute("aria-pressed", "false");
  if (ui.state.dataset.state === "listening") setState("idle");
}

ui.talk.addEventListener("click", () => {
  replyAudio.unlock();
  if (input) stopMic();
  else startMic();
});

function showMute() {
  ui.mute.setAttribute("aria-pressed", String(muted));
  ui.mute.title = muted ? "Spoken replies are muted: the server sends text only" : "Spoken replies are on";
}

ui.mute.addEventListener("click", () => {
  muted = !muted;
  storeMuted(muted);
  start.speak = !muted; // the next session.start (reconnect or reload)
  client.send({ type: "session.update", speak: !muted }); // this session, now (when started)
  replyAudio.setMuted(muted);
  replyAudio.unlock();
  showMute();
});

ui.form.addEventListener("submit", (ev) => {
  ev.preventDefault();
  replyAudio.unlock();
  const text = ui.text.value.trim();
  if (!text) return;
  if (!client.send({ type: "text", text })) {
    showError("Not connected: the message was not sent.");
    return;
  }
  addTurn("user", "You", { kind: "user", text }).body.textContent = text;
  saveTranscript();
  ui.text.value = "";
});

setInterval(() => {
  if (!input) return;
  ui.meter.value = input.level;
  ui.meter.textContent = `${Math.round(input.level * 100)}%`;
  input.level *= 0.9; // fall back when frames stop
}, 50);

// Close the socket on the way out so the server detaches the conversation
// before the reloaded page asks to resume it.
window.addEventListener("pagehide", () => {
  saveTranscript(); // with any reply still streaming
  client.close();
});

setState("idle");
showTransport("off");
showMute();
const earlier = loadTranscript();
if (earlier && earlier.sessionId === client.sessionId) {
  restoreTurns(earlier.turns);
  transcript.sessionId = earlier.sessionId;
}
client.connect();
