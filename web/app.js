// The dashboard: every call of the server, live, through /client in JSON mode (README "Dashboard").
//
// One websocket subscribes to every call ("*") with their history (calls in progress from their
// start), the calls that ended lately ("recent") and the server's health figures ("health").
// Opening an ended call whose messages the page has not seen asks for that call's history on a
// second, short-lived websocket. The token, when the server wants one, travels as a websocket
// subprotocol ("bearer.<token>"): never in a URL.
//
// Everything that comes from a call (transcripts, parameters, tool arguments) is inserted with
// textContent, never as HTML.

"use strict";

const SUBPROTOCOL = "twilio-transcribe";
const TOKEN_PATTERN = /^[A-Za-z0-9._~-]{16,}$/; // what CLIENT_TOKENS accepts
const TOKEN_KEY = "twilio-transcribe-token"; // sessionStorage: this tab only
const RETRY_SECONDS = [1, 1, 2, 3, 5];
const CHANNELS = ["Caller", "Other party"]; // a transcription call's channel_index[0]
const ROLES = { user: "Caller", agent: "Agent" };
const KEEP_ENDED = 300; // ended calls the page keeps (oldest end goes first); calls in progress all stay

const calls = new Map(); // callSid -> Call
const endedOrder = []; // the ended calls, oldest end first
let selected = null; // the Call shown on the right
let socket = null; // the "*" subscription
let attempt = 0; // reconnection attempts since the last success
let retryTimer = 0;

const $ = (id) => document.getElementById(id);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function clock(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  const hours = Math.floor(s / 3600);
  const rest = `${String(Math.floor(s / 60) % 60).padStart(hours ? 2 : 1, "0")}:${String(s % 60).padStart(2, "0")}`;
  return hours ? `${hours}:${rest}` : rest;
}

function timeOfDay(date) {
  return [date.getHours(), date.getMinutes(), date.getSeconds()].map((n) => String(n).padStart(2, "0")).join(":");
}

// 32-bit FNV-1a of a message's text: enough to recognise, at a known position, a message shown
// already, without keeping a second copy of every message.
function fingerprint(text) {
  let hash = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    hash ^= text.charCodeAt(i);
    hash = Math.imul(hash, 0x01000193);
  }
  return hash >>> 0;
}

function seconds(value) {
  return value === undefined || value === null ? "–" : `${Number(value).toFixed(1)} s`;
}

// --- one call -------------------------------------------------------------------------------

class Call {
  constructor(started) {
    this.sid = started.callSid;
    this.info = started;
    this.ended = null; // the call_ended event
    this.lines = element("ol", "transcript");
    this.interims = new Map(); // channel -> the line showing its interim text
    this.seen = []; // a fingerprint of every message applied: a replay of them is skipped
    this.cursor = null; // while a replay is being matched against `seen`: its position
    this.incomplete = false; // messages may be missing (seen only in summary, or the socket dropped)
    this.loading = false;
    this.note = "";
    this.endLine = null;
    this.live = { messages: 0, audioSeconds: 0, turns: 0, bargeIns: 0, toolCalls: 0, dtmf: 0, tokens: null };
    this.row = element("tr");
    this.row.tabIndex = 0;
    this.cells = {};
    for (const name of ["sid", "mode", "started", "duration", "parameters", "outcome"]) {
      this.cells[name] = this.row.appendChild(element("td", `cell-${name}`));
    }
    rows.set(this.row, this);
  }

  get agent() {
    return this.info.mode === "agent";
  }

  get startTime() {
    return Date.parse(this.info.startTime) || 0;
  }

  receive(message) {
    switch (message.type) {
      case "call_started":
        // Again: a replay of the call follows (reconnected, or its history asked for), and the
        // messages already shown are recognised and skipped.
        this.info = message;
        this.cursor = 0;
        break;
      case "history_truncated":
        this.cursor = message.omitted;
        if (this.seen.length < message.omitted) this.addNote(`${message.omitted} early messages were not kept by the server.`);
        break;
      case "call_ended":
        if (!this.ended) retire(this);
        this.ended = message;
        this.cursor = null;
        if (this.seen.length === 0) this.incomplete = true; // known from a summary only
        this.endLine = this.endLine || this.addLine("event ended", "", "Call ended", "");
        this.endLine.querySelector(".said").textContent = outcomeText(message);
        this.lines.append(this.endLine); // last, also after a replay of what it missed
        break;
      default:
        if (this.repeated(message)) return;
        this.apply(message);
    }
    this.update();
  }

  repeated(message) {
    const print = fingerprint(JSON.stringify(message));
    if (this.cursor !== null) {
      if (this.cursor < this.seen.length && this.seen[this.cursor] === print) {
        this.cursor += 1;
        return true;
      }
      this.cursor = null;
    }
    this.seen.push(print);
    return false;
  }

  apply(message) {
    if (Object.hasOwn(HANDLERS, message.type)) HANDLERS[message.type](this, message);
  }

  addLine(kind, time, who, text, detail) {
    const line = element("li", `line ${kind}`);
    line.append(element("span", "time", time), element("span", "who", who));
    const body = line.appendChild(element("span", "text"));
    body.append(element("span", "said", text));
    if (detail) body.append(element("span", "detail", detail));
    this.lines.append(line);
    if (this === selected) followLines();
    return line;
  }

  addNote(text) {
    this.note = text;
  }

  transcript(message) {
    this.live.messages += 1;
    const data = message.data || {};
    // An agent call's provider messages are shown through the `conversation` events instead.
    if (this.agent || data.type !== "Results") return;
    const channel = (data.channel_index || [0])[0];
    const text = ((data.channel || {}).alternatives || [{}])[0].transcript || "";
    this.live.audioSeconds = Math.max(this.live.audioSeconds, (data.start || 0) + (data.duration || 0));
    let line = this.interims.get(channel);
    if (!text) {
      if (line && data.is_final) {
        line.remove();
        this.interims.delete(channel);
      }
      return;
    }
    if (!line) {
      line = this.addLine(`speech speaker-${channel}`, clock(data.start || 0), CHANNELS[channel] || `Channel ${channel}`, text);
    } else {
      line.querySelector(".said").textContent = text;
    }
    if (data.is_final) {
      line.classList.remove("interim");
      this.interims.delete(channel);
    } else {
      line.classList.add("interim");
      this.interims.set(channel, line);
    }
    if (this === selected) followLines();
  }

  figures() {
    const ended = this.ended || {};
    const agent = ended.agent || {};
    const live = this.live;
    if (!this.agent) {
      const anomalies = ended.anomalies || {};
      return [
        ["audio", seconds(ended.audioSeconds ?? live.audioSeconds)],
        ["messages", ended.messages ?? live.messages],
        ["gaps", anomalies.gaps ?? "–"],
        ["late chunks", anomalies.late ?? "–"],
        ["reconnects", ended.reconnects ?? "–"],
      ];
    }
    const tokens = agent.tokens || live.tokens;
    return [
      ["caller audio", seconds(ended.audioSeconds)],
      ["turns", agent.turns ?? live.turns],
      ["barge-ins", agent.bargeIns ?? live.bargeIns],
      ["tool calls", agent.toolCalls ?? live.toolCalls],
      ["DTMF", agent.dtmf ?? live.dtmf],
      ["agent heard", seconds(agent.playedSeconds)],
      ["tokens", tokens ? Object.entries(tokens).map(([kind, n]) => `${n} ${kind}`).join(", ") : "–"],
      ["provider messages", ended.messages ?? "–"],
    ];
  }

  update() {
    const info = this.info;
    this.cells.sid.textContent = this.sid;
    this.cells.mode.textContent = modeText(info);
    this.cells.started.textContent = info.startTime ? timeOfDay(new Date(info.startTime)) : "–";
    this.cells.parameters.textContent = Object.entries(info.customParameters || {}).map(([k, v]) => `${k}=${v}`).join(", ");
    this.cells.outcome.textContent = this.ended ? outcomeText(this.ended) : "in progress";
    this.row.classList.toggle("ended", Boolean(this.ended));
    this.row.classList.toggle("failed", Boolean(this.ended && this.ended.error));
    this.tick();
    filterRow(this);
    if (this === selected) showCall(this);
  }

  tick() {
    const duration = this.ended ? this.ended.duration : (Date.now() - this.startTime) / 1000;
    this.cells.duration.textContent = duration === undefined ? "–" : clock(duration);
  }
}

function modeText(info) {
  return info.mode === "agent" ? `agent · ${info.provider || "?"}` : "transcription";
}

function outcomeText(ended) {
  const outcome = ended.endOfCall || "ended";
  return ended.error ? `${outcome}: ${ended.error}` : ended.endReason ? `${outcome}: ${ended.endReason}` : outcome;
}

function at(message) {
  return typeof message.at === "number" ? clock(message.at) : "";
}

// What each event of a call shows (README "Watching agent calls").
const HANDLERS = {
  transcript: (call, m) => call.transcript(m),
  conversation: (call, m) => {
    const who = Object.hasOwn(ROLES, m.role) ? ROLES[m.role] : m.role;
    if (m.role === "agent") call.live.turns += 1;
    if (!m.interrupted) return call.addLine(`speech role-${m.role}`, at(m), who, m.text);
    const heard = `cut off after ${seconds(m.heardSeconds)}; the whole reply: “${m.fullText}”`;
    return call.addLine(`speech role-${m.role} cut`, at(m), who, m.text || "(nothing heard)", heard);
  },
  barge_in: (call, m) => {
    call.live.bargeIns += 1;
    call.addLine("event barge-in", at(m), "Barge-in",
      `the caller spoke over the agent after ${seconds(m.heardSeconds)} of ${m.segment || "its reply"}; ${seconds(m.discardedSeconds)} of audio discarded`);
  },
  dtmf: (call, m) => {
    call.live.dtmf += 1;
    call.addLine("event dtmf", at(m), "Key", m.digit);
  },
  tool_call: (call, m) => {
    call.live.toolCalls += 1;
    call.addLine("event tool", at(m), "Tool call", `${m.name}(${JSON.stringify(m.arguments)})`);
  },
  tool_result: (call, m) => {
    const how = m.ok ? `ok in ${Number(m.seconds).toFixed(3)} s` : `failed (${m.error})`;
    call.addLine(`event tool ${m.ok ? "" : "failed"}`, at(m), "Tool result", `${m.name} ${how}: ${m.result}`);
  },
  latency: (call, m) => {
    const stages = Object.entries(m.seconds || {}).filter(([stage]) => stage !== "total")
      .map(([stage, value]) => `${stage} ${Number(value).toFixed(2)}`).join(", ");
    const total = m.seconds && m.seconds.total !== undefined ? `${Number(m.seconds.total).toFixed(2)} s` : "";
    call.addLine("event latency", at(m), "Latency", `${m.segment || "turn"}: ${total}${stages ? ` (${stages})` : ""}`);
  },
  usage: (call, m) => {
    call.live.tokens = m.tokens;
  },
  error: (call, m) => {
    const where = m.source ? `${m.source}${m.fatal ? ", fatal" : ""}` : "recogniser";
    call.addLine(`event error ${m.fatal === false ? "warning" : ""}`, at(m), "Error", `${where}: ${m.message}`);
  },
};

// --- the list of calls ----------------------------------------------------------------------

const rows = new WeakMap(); // table row -> Call

function callFor(started) {
  let call = calls.get(started.callSid);
  if (call) return call;
  call = new Call(started);
  calls.set(call.sid, call);
  // Newest start first.
  const body = $("calls").tBodies[0];
  const later = [...body.rows].find((row) => rows.get(row).startTime < call.startTime);
  body.insertBefore(call.row, later || null);
  $("no-calls").hidden = true;
  return call;
}

// Keep the page's memory bounded on a busy server: the oldest ended calls leave the list.
function retire(call) {
  endedOrder.push(call);
  while (endedOrder.length > KEEP_ENDED) {
    const oldest = endedOrder.shift();
    if (oldest === selected) {
      endedOrder.push(oldest); // not while someone reads it
      if (endedOrder.length === 1) break;
      continue;
    }
    calls.delete(oldest.sid);
    oldest.row.remove();
  }
}

function filterRow(call) {
  const words = $("filter").value.trim().toLowerCase();
  if (!words) {
    call.row.hidden = false;
    return;
  }
  const text = `${call.row.textContent} ${call.lines.textContent}`.toLowerCase();
  call.row.hidden = !text.includes(words);
}

function select(call) {
  if (selected) selected.row.classList.remove("selected");
  selected = call;
  call.row.classList.add("selected");
  if (call.ended && call.incomplete) loadHistory(call);
  showCall(call);
  followLines(true);
}

function showCall(call) {
  $("no-selection").hidden = true;
  $("call-view").hidden = false;
  $("call-sid").textContent = call.sid;
  $("call-mode").textContent = modeText(call.info);
  const outcome = $("call-outcome");
  outcome.textContent = call.ended ? outcomeText(call.ended) : "in progress";
  outcome.className = `badge ${call.ended ? (call.ended.error ? "failed" : "ended") : "live"}`;
  const figures = $("call-figures");
  figures.replaceChildren();
  const started = call.info.startTime ? new Date(call.info.startTime) : null;
  for (const [name, value] of [["started", started ? timeOfDay(started) : "–"], ["duration", call.cells.duration.textContent],
    ["parameters", call.cells.parameters.textContent || "none"], ...call.figures()]) {
    const pair = figures.appendChild(element("div"));
    pair.append(element("dt", "", name), element("dd", "", value));
  }
  const note = call.loading ? "Loading this call's history…" : call.note;
  $("call-note").textContent = note;
  $("call-note").hidden = !note;
  const lines = $("lines");
  if (lines.firstChild !== call.lines) lines.replaceChildren(call.lines);
}

function followLines(always) {
  const lines = $("lines");
  if (always || lines.scrollHeight - lines.scrollTop - lines.clientHeight < 80) lines.scrollTop = lines.scrollHeight;
}

// --- health -----------------------------------------------------------------------------------

function showHealth(health) {
  $("health").hidden = false;
  for (const dd of $("health").querySelectorAll("dd[data-figure]")) {
    const value = health[dd.dataset.figure];
    dd.textContent = value === undefined ? "–" : value;
    dd.classList.toggle("bad", /Errors|dropped/.test(dd.dataset.figure) && value > 0);
  }
}

// --- the connection ---------------------------------------------------------------------------

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function protocols() {
  return token() ? [SUBPROTOCOL, `bearer.${token()}`] : [SUBPROTOCOL];
}

function clientURL() {
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/client`;
}

function dispatch(message) {
  if (message.type === "health") return showHealth(message);
  const call = message.type === "call_started" ? callFor(message) : calls.get(message.callSid);
  if (call) call.receive(message);
}

function connect() {
  clearTimeout(retryTimer);
  const ws = new WebSocket(clientURL(), protocols());
  socket = ws;
  let opened = false;
  let greeted = false;
  ws.onopen = () => {
    opened = true;
    attempt = 0;
    ws.send(JSON.stringify({ type: "subscribe", callSid: "*", history: true, recent: true, health: true }));
    setConnection("live", "Live");
    $("notice").hidden = true;
    $("token-form").hidden = true;
    $("main").hidden = false;
    $("forget-token").hidden = !token();
  };
  ws.onmessage = (event) => {
    if (socket !== ws) return;
    const message = JSON.parse(event.data);
    if (!greeted) {
      greeted = true;
      return greeting(message);
    }
    dispatch(message);
  };
  ws.onclose = (event) => {
    if (socket !== ws) return;
    socket = null;
    if (opened) disconnected(event);
    else refused();
  };
}

// The first message: the calls in progress now. One the page shows as in progress that is not
// among them ended while the page was away; a "recent" summary may still say how.
function greeting(inProgress) {
  const now = new Set(inProgress);
  for (const call of calls.values()) {
    if (!call.ended && !now.has(call.sid)) {
      call.receive({ type: "call_ended", callSid: call.sid, endOfCall: "unknown",
        error: "ended while the dashboard was disconnected" });
      call.incomplete = true;
    }
  }
}

function disconnected(event) {
  for (const call of calls.values()) if (!call.ended) call.incomplete = true;
  retry(event.code === 4429 ? "Disconnected: this page fell behind the server" : "Disconnected from the server");
}

// The handshake failed: a browser is not told why, so ask the same route over plain HTTP.
async function refused() {
  let status = 0;
  try {
    const headers = token() ? { Authorization: `Bearer ${token()}` } : {};
    status = (await fetch("/client", { headers, cache: "no-store" })).status;
  } catch (error) {
    status = 0; // not reachable
  }
  if (status === 401) {
    const refusedToken = Boolean(token());
    sessionStorage.removeItem(TOKEN_KEY); // a reload asks again rather than retrying it
    return askForToken(refusedToken ? "The server refused this token." : "");
  }
  retry(status === 0 ? "Disconnected: the server cannot be reached"
    : status === 503 ? "The server is busy or shutting down" : `The server refused the connection (HTTP ${status})`);
}

function retry(why) {
  const delay = RETRY_SECONDS[Math.min(attempt, RETRY_SECONDS.length - 1)];
  attempt += 1;
  setConnection("down", "Reconnecting…");
  const notice = $("notice");
  notice.textContent = `${why}. Reconnecting in ${delay} s (attempt ${attempt})…`;
  notice.hidden = false;
  retryTimer = setTimeout(connect, delay * 1000);
}

function setConnection(state, text) {
  const status = $("connection");
  status.textContent = text;
  status.className = `connection ${state}`;
}

// Without a valid token nothing about any call stays on the page.
function askForToken(error) {
  forgetCalls();
  setConnection("down", "Token needed");
  $("notice").hidden = true;
  $("main").hidden = true;
  $("health").hidden = true;
  $("forget-token").hidden = true;
  $("token-form").hidden = false;
  $("token-error").textContent = error;
  $("token").focus();
}

function forgetCalls() {
  calls.clear();
  endedOrder.length = 0;
  selected = null;
  $("calls").tBodies[0].replaceChildren();
  $("lines").replaceChildren();
  $("no-calls").hidden = false;
  $("call-view").hidden = true;
  $("no-selection").hidden = false;
}

// An ended call the page has not seen whole: its history, on a websocket of its own.
function loadHistory(call) {
  if (call.loading) return;
  call.loading = true;
  const ws = new WebSocket(clientURL(), protocols());
  let greeted = false;
  ws.onopen = () => ws.send(JSON.stringify({ type: "subscribe", callSid: call.sid, history: true }));
  ws.onmessage = (event) => {
    if (greeted) call.receive(JSON.parse(event.data));
    greeted = true;
  };
  ws.onclose = (event) => {
    call.loading = false;
    if (event.code === 1000) call.incomplete = false;
    else if (event.code === 4404) call.addNote("The server no longer keeps this call's messages (HISTORY_SECONDS).");
    else call.addNote(`This call's history could not be loaded (${event.code}).`);
    call.update();
  };
}

// --- start ------------------------------------------------------------------------------------

function start() {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (!TOKEN_PATTERN.test(value)) {
      $("token-error").textContent = "A token is at least 16 characters of A–Z, a–z, 0–9 and . _ ~ -";
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, value);
    $("token").value = "";
    $("token-error").textContent = "";
    $("token-form").hidden = true;
    setConnection("", "Connecting…");
    connect();
  });
  $("forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    if (socket) {
      const ws = socket;
      socket = null;
      ws.close();
    }
    askForToken("");
  });
  $("filter").addEventListener("input", () => calls.forEach(filterRow));
  const body = $("calls").tBodies[0];
  body.addEventListener("click", (event) => {
    const row = event.target.closest("tr");
    if (row && rows.has(row)) select(rows.get(row));
  });
  body.addEventListener("keydown", (event) => {
    const row = event.target.closest("tr");
    if ((event.key === "Enter" || event.key === " ") && row && rows.has(row)) {
      event.preventDefault();
      select(rows.get(row));
    }
  });
  setInterval(() => {
    for (const call of calls.values()) if (!call.ended) call.tick();
    if (selected && !selected.ended) showCall(selected);
  }, 1000);
  connect();
}

start();
