// The page: wires the realtime client and the audio input to the DOM
// (talk button, live state, level meter, conversation, typed turns).

import { RealtimeClient, realtimeUrl } from "./protocol.js";
import { createAudioInput, Recorder, Player } from "./audio.js";

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
  conn: byId("connection"),
  errors: byId("errors"),
};

const start = { device: params.get("device") || "browser" };
if (params.get("token")) start.token = params.get("token");
if (params.get("speak") === "0") start.speak = false;

const client = new RealtimeClient(realtimeUrl(params), start);
const recorder = new Recorder();
const player = new Player();
let input = null; // the audio input while the mic is on
let speaking = false; // between speech.started and speech.stopped
const userTurns = new Map(); // utterance_id -> element
const replies = new Map(); // reply_id -> { el, body, text }

// ---------------------------------------------------------------- state

function setState(s) {
  ui.state.textContent = s;
  ui.state.dataset.state = s;
  document.body.dataset.state = s;
}

function restingState() {
  return speaking ? "speech" : input ? "listening" : "idle";
}

// ---------------------------------------------------------------- conversation

function nearBottom() {
  return ui.conv.scrollHeight - ui.conv.scrollTop - ui.conv.clientHeight < 120;
}

function addTurn(kind, who) {
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
  return { li, meta, body };
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
    const t = addTurn("assistant", "Assistant");
    r = { ...t, text: "", got: false };
    t.li.dataset.replyId = id;
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
  player.stop();
  setState(restingState());
  if (code === 1008) showError(`The server refused the connection: ${reason || "token or origin not allowed"}.`);
  else if (code === 1013) showError("The server is at its session limit; trying again shortly.");
});

client.on("session.started", (msg) => {
  recorder.reset(); // stream positions count from this session's first sample
  ui.banner.hidden = msg.demo_model !== true;
  ui.conn.title = msg.model ? `model: ${msg.model}` : "";
});

client.on("speech.started", (msg) => {
  speaking = true;
  const t = addTurn("user", "You");
  t.meta.textContent = "speaking…";
  t.body.textContent = "Speaking…";
  userTurns.set(msg.utterance_id, t);
  setState("speech");
});

client.on("speech.stopped", (msg) => {
  speaking = false;
  const t = userTurns.get(msg.utterance_id) || addTurn("user", "You");
  userTurns.delete(msg.utterance_id);
  const ms = Math.max(0, msg.end_ms - msg.start_ms);
  const seconds = (ms / 1000).toFixed(1);
  t.meta.textContent = `${seconds} s`;
  t.li.dataset.durationMs = String(ms);
  const pcm = recorder.cut(msg.start_ms, msg.end_ms);
  t.body.textContent = pcm ? "" : "Spoken (audio not kept)";
  if (pcm) t.body.append(playButton(pcm, seconds));
  setState("thinking");
});

client.on("reply.started", (msg) => {
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
  r.text += msg.text || "";
  r.body.textContent = r.text;
  if (follow) ui.conv.scrollTop = ui.conv.scrollHeight;
});

client.on("reply.done", (msg) => {
  const r = replyTurn(msg.reply_id);
  r.text = typeof msg.text === "string" ? msg.text : r.text;
  r.body.textContent = r.text;
  const timing = msg.timing || {};
  r.meta.textContent = timing.ttft_ms != null ? `first words after ${Math.round(timing.ttft_ms)} ms` : "";
  replies.delete(msg.reply_id);
  setState(restingState());
});

client.on("reply.cancelled", (msg) => {
  const r = replyTurn(msg.reply_id);
  if (typeof msg.text === "string") r.text = msg.text;
  r.body.textContent = r.text || "(nothing said yet)";
  r.li.classList.add("cancelled");
  r.meta.textContent = "";
  const label = document.createElement("span");
  label.className = "cut-label";
  label.textContent = msg.reason === "barge_in" ? "cut off (you spoke)" : "cut off";
  r.meta.append(label);
  replies.delete(msg.reply_id);
  player.stop();
  setState(restingState());
});

client.on("command", (msg) => {
  const t = addTurn("command", "Command");
  t.body.textContent = `${msg.action} ${msg.target}${msg.value != null ? ` = ${msg.value}` : ""}`;
});

client.on("reply.audio.started", (msg) => player.begin(msg.sample_rate));
client.on("audio", (buffer) => player.push(buffer));

client.on("error", (msg) => showError(`${msg.code || "error"}: ${msg.message || "something went wrong"}`));

// ---------------------------------------------------------------- controls

async function startMic() {
  ui.talk.disabled = true;
  const candidate = createAudioInput(params.get("transport") || "ws", client, (pcm) => recorder.append(pcm));
  try {
    await candidate.start();
    input = candidate;
    ui.talk.textContent = "Stop";
    ui.talk.setAttribute("aria-pressed", "true");
    if (ui.state.dataset.state === "idle") setState("listening");
  } catch (err) {
    const denied = err && (err.name === "NotAllowedError" || err.name === "SecurityError");
    showError(denied ? "Microphone permission was denied." : `Could not start the microphone: ${err.message || err}`);
  } finally {
    ui.talk.disabled = false;
  }
}

function stopMic() {
  if (speaking) client.send({ type: "audio.commit" }); // close the utterance now
  input.stop();
  input = null;
  ui.meter.value = 0;
  ui.talk.textContent = "Start";
  ui.talk.setAttribute("aria-pressed", "false");
  if (ui.state.dataset.state === "listening") setState("idle");
}

ui.talk.addEventListener("click", () => (input ? stopMic() : startMic()));

ui.form.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = ui.text.value.trim();
  if (!text) return;
  if (!client.send({ type: "text", text })) {
    showError("Not connected: the message was not sent.");
    return;
  }
  addTurn("user", "You").body.textContent = text;
  ui.text.value = "";
});

setInterval(() => {
  if (!input) return;
  ui.meter.value = input.level;
  ui.meter.textContent = `${Math.round(input.level * 100)}%`;
  input.level *= 0.9; // fall back when frames stop
}, 50);

setState("idle");
client.connect();
