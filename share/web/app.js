// The llmws page: chat, settings, resources and models over one ResumableConnection.
"use strict";

const SETTINGS_KEY = "llmws.settings";
const SERVER_KEY = "llmws.server";
const PENDING_KEY = "llmws.pendingPrompt"; // the question of an unfinished answer, for a reload
const STATS_KEY = "llmws.answerStats"; // {session, answers: [{id, hash, stats}]}: stats lines for a reload
const STATS_KEPT = 400; // answers remembered per session (the server keeps 200 messages by default)
// A new session's settings as the server chose them (welcome's config: the model's and the
// operator's defaults); the page shows them, and sends settings of its own only once the
// user has changed one. These values stand in until the first welcome.
let serverDefaults = { system: "", temperature: 0.7, top_p: 0.95, top_k: 50, max_new_tokens: 512 };

// ---------------------------------------------------------------------------------------------
// Chat

// Where the streaming cursor goes: the end of the innermost last block (paragraph, item, code).
function lastTextBlock(root) {
  let node = root;
  while (node.lastElementChild && /^(P|UL|OL|LI|BLOCKQUOTE|DIV|PRE|H\d)$/.test(node.lastElementChild.tagName)) {
    node = node.lastElementChild;
  }
  return node;
}

// Errors after which the same question may well get an answer.
const RETRYABLE = new Set(["busy", "interrupted", "session_lost", "internal", "no_model"]);

const answerOf = new WeakMap(); // an assistant message's node -> its Answer

// "40 tokens · 23.6 tok/s · first token 159 ms · hit the token limit", from a `done` event.
function statsLine(done) {
  const parts = [];
  if (Number.isFinite(done.total_tokens)) parts.push(`${done.total_tokens} tokens`);
  if (Number.isFinite(done.tokens_per_s)) parts.push(`${done.tokens_per_s.toFixed(1)} tok/s`);
  if (Number.isFinite(done.ttft_ms)) parts.push(`first token ${Math.round(done.ttft_ms)} ms`);
  if (done.finish_reason === "cancelled") parts.push("stopped");
  else if (done.finish_reason === "length") parts.push("hit the token limit");
  return parts.join(" · ");
}

// A short fingerprint of an answer's text, to find the answer again in the session's history.
function fingerprint(text) {
  let hash = 0x811c9dc5; // FNV-1a over the UTF-16 code units
  for (let i = 0; i < text.length; i += 1) {
    hash ^= text.charCodeAt(i);
    hash = Math.imul(hash, 0x01000193);
  }
  return `${text.length}:${(hash >>> 0).toString(36)}`;
}

// Each ended answer's stats (or error), kept in localStorage for the session: the server's
// `history` has only the texts, and its buffered `done` events are dropped once acknowledged.
const savedStats = {
  read(session) {
    const saved = readJSON(STATS_KEY, null);
    return saved && saved.session === session && Array.isArray(saved.answers) ? saved.answers : [];
  },

  remember(session, requestId, text, stats) {
    if (!session) return;
    const answers = this.read(session).filter((a) => a.id !== requestId); // a replayed `done`
    answers.push({ id: requestId, hash: fingerprint(text), stats });
    writeJSON(STATS_KEY, { session, answers: answers.slice(-STATS_KEPT) });
  },

  forget() {
    writeJSON(STATS_KEY, null);
  },

  // A function from each assistant message of `history`, in order, to its stats or null. The
  // answers are matched in order: the history may have lost its oldest turns, or hold turns
  // that this browser never saw, and two answers may have the same text.
  matcher(session) {
    const answers = this.read(session);
    let next = 0;
    return (text) => {
      const hash = fingerprint(text);
      for (let i = next; i < answers.length; i += 1) {
        if (answers[i].hash === hash) {
          next = i + 1;
          return answers[i].stats;
        }
      }
      return null;
    };
  },
};

// One assistant answer: its raw text, rendered as Markdown at most once per frame.
class Answer {
  constructor() {
    this.requestId = null;
    this.text = "";
    this.prompt = ""; // the question, when this page asked it (for "Ask again")
    this.pieces = 0; // token events received
    this.status = "waiting"; // waiting, streaming, done, failed
    this.root = el("article", "msg assistant");
    this.body = el("div", "body");
    this.body.appendChild(el("span", "typing", "…"));
    this.meta = el("div", "meta");
    this.error = el("div", "error");
    this.error.hidden = true;
    this.root.append(this.body, this.error, this.meta);
    this.renderQueued = false;
    answerOf.set(this.root, this);
  }

  append(piece) {
    this.status = "streaming";
    this.text += piece;
    this.pieces += 1;
    this.scheduleRender();
  }

  scheduleRender() {
    if (this.renderQueued) return;
    this.renderQueued = true;
    requestAnimationFrame(() => {
      this.renderQueued = false;
      const follow = chat.isAtBottom();
      this.body.replaceChildren(Markdown.render(this.text));
      if (this.status === "streaming") lastTextBlock(this.body).appendChild(el("span", "cursor"));
      if (follow) chat.scrollToBottom();
    });
  }

  finish(done) {
    this.status = "done";
    this.meta.textContent = statsLine(done);
    this.scheduleRender();
  }

  // Shows `message` beside the answer without ending it.
  warn(message) {
    this.error.replaceChildren(el("strong", "", errorText(message)), el("code", "", message.code || ""));
    this.error.hidden = false;
  }

  fail(message) {
    this.status = "failed";
    this.warn(message);
    if (this.prompt && RETRYABLE.has(message.code)) {
      const retry = el("button", "ghost small", "Ask again");
      retry.type = "button";
      retry.addEventListener("click", () => {
        $("prompt").value = this.prompt;
        sendPrompt();
      });
      this.error.appendChild(retry);
    }
    if (!this.text) this.body.replaceChildren();
    this.scheduleRender();
  }
}

const chat = {
  messages: $("messages"),
  answers: new Map(), // request_id -> Answer
  waiting: null, // the Answer to our last `inference`, until its `start` names it
  active: null, // the Answer being generated, if any
  restoring: false, // a fresh load's resume: events so far are reconciled with `history`
  resetWhenEnded: false, // "New chat" was pressed during an answer

  isAtBottom() {
    const m = this.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
  },

  scrollToBottom() {
    this.messages.scrollTop = this.messages.scrollHeight;
  },

  add(node) {
    $("empty").hidden = true;
    this.messages.appendChild(node);
    this.scrollToBottom();
    return node;
  },

  addUser(text) {
    const node = el("article", "msg user");
    node.appendChild(el("div", "body", text));
    return this.add(node);
  },

  addNote(text) {
    return this.add(el("div", "note", text));
  },

  // An ended answer from the session's history, with its saved stats or error if any.
  addAssistant(text, stats = null) {
    const answer = new Answer();
    answer.status = "done";
    answer.text = text;
    if (stats && stats.error) {
      answer.status = "failed";
      answer.warn(stats.error);
    } else if (stats) {
      answer.meta.textContent = statsLine(stats);
    }
    answer.scheduleRender();
    this.add(answer.root);
    return answer;
  },

  clear() {
    this.answers.clear();
    this.waiting = this.active = null;
    this.messages.replaceChildren($("empty"));
    $("empty").hidden = false;
    setGenerating(false);
  },

  answerFor(message) {
    let answer = this.answers.get(message.request_id);
    if (!answer) {
      // Our own request's first event, or a replayed one from before a reload.
      answer = this.waiting && message.type === "start" ? this.waiting : new Answer();
      if (answer === this.waiting) this.waiting = null;
      else this.add(answer.root);
      answer.requestId = message.request_id;
      this.answers.set(message.request_id, answer);
    }
    return answer;
  },

  // A fresh load: show the session's conversation and the answers replayed from its buffer.
  // A replayed answer that has ended is in the history too: it takes that turn's place (it
  // carries its stats or error); one still generating goes last, after its question.
  restore(history) {
    const replayed = [...this.answers.values()];
    const ended = new Map(replayed.filter((a) => a.status === "done" || a.status === "failed")
      .map((a) => [a.text, a]));
    const pending = readJSON(PENDING_KEY, null);
    const statsOf = savedStats.matcher(connection.sessionId);
    this.clear();
    for (const message of history) {
      if (message.role === "user") {
        this.addUser(message.content);
      } else if (message.role === "assistant") {
        const answer = ended.get(message.content);
        ended.delete(message.content);
        const stats = statsOf(message.content);
        if (answer) this.add(answer.root);
        else this.addAssistant(message.content, stats);
      }
    }
    for (const answer of replayed) {
      this.answers.set(answer.requestId, answer);
      if (answer.root.isConnected) continue;
      if (pending && pending.requestId === answer.requestId) this.addUser(pending.text);
      this.add(answer.root);
      if (answer.status === "waiting" || answer.status === "streaming") this.active = answer;
    }
    setGenerating(this.active !== null);
    this.restoring = false;
    if (!this.active) connection.ack(connection.lastSeq);
  },
};

function setGenerating(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
}

function sendPrompt() {
  const input = $("prompt");
  const text = input.value.trim();
  if (!text || chat.active || chat.waiting) return;
  const settings = readSettings();
  const message = { type: "inference", prompt: { system: settings.system, user: text } };
  if (readJSON(SETTINGS_KEY, null)) {
    message.config = {
      temperature: settings.temperature,
      top_p: settings.top_p,
      top_k: settings.top_k,
      max_new_tokens: settings.max_new_tokens,
      do_sample: settings.temperature > 0,
    };
  }
  const sent = connection.send(message);
  if (!sent) {
    toast("Not connected: the message was not sent. It will be possible once the page reconnects.");
    return;
  }
  writeJSON(PENDING_KEY, { text, requestId: null });
  chat.addUser(text);
  chat.waiting = chat.active = new Answer();
  chat.waiting.prompt = text;
  chat.add(chat.waiting.root);
  input.value = "";
  autosize(input);
  setGenerating(true);
}

// A running answer is cancelled first, and the conversation reset once it has ended: a reset
// before that would let the cancelled turn land in the new conversation.
function newChat() {
  const running = chat.active || chat.waiting;
  if (!connection.send(running ? { type: "cancel" } : { type: "reset" })) {
    toast("Not connected.");
    return;
  }
  chat.resetWhenEnded = Boolean(running);
}

function autosize(textarea) {
  textarea.style.height = "auto";
  textarea.style.height = Math.min(textarea.scrollHeight, 220) + "px";
}

// ---------------------------------------------------------------------------------------------
// Server messages

const handlers = {
  welcome(message, info) {
    const caps = message.capabilities || {};
    showServerFacts(message.model, caps.device || (message.resources || {}).device, caps.max_context);
    if (!message.model) $("fact-model").textContent = message.model_state === "loading" ? "loading…" : "no model";
    if (message.resources) resources.sample(message.resources);
    if (message.config) {
      const { temperature, top_p, top_k, max_new_tokens } = message.config;
      serverDefaults = { system: "", temperature, top_p, top_k, max_new_tokens };
      if (!readJSON(SETTINGS_KEY, null)) showSettings(serverDefaults);
    }
    if (info.fresh && message.resumed) {
      chat.restoring = true;
      connection.send({ type: "history" });
    } else if (!message.resumed) {
      // A new session: its request ids start over, and an answer in progress is gone.
      chat.answers.clear();
      const unfinished = chat.active || chat.waiting;
      if (unfinished) {
        unfinished.fail({ code: "session_lost", message: "The server no longer has this conversation; the answer stops here." });
        chat.active = chat.waiting = null;
        setGenerating(false);
      }
      if (info.lostSession) chat.addNote("The server no longer had this conversation: a new one starts here.");
    }
    connection.send({ type: "subscribe_resources", interval: RESOURCES_INTERVAL_S });
    connection.send({ type: "list_models" });
    renderConnectionFacts();
  },

  history(message) {
    const history = Array.isArray(message.messages) ? message.messages : message.history || [];
    if (chat.restoring) chat.restore(history);
  },

  start(message) {
    const answer = chat.answerFor(message);
    answer.status = "streaming";
    chat.active = answer;
    setGenerating(true);
    const pending = readJSON(PENDING_KEY, null);
    if (pending && !pending.requestId) writeJSON(PENDING_KEY, { ...pending, requestId: message.request_id });
    if (message.dropped_turns > 0) {
      answer.meta.textContent = `${message.dropped_turns} oldest turns left out to fit the context`;
    }
  },

  token(message) {
    const answer = chat.answerFor(message);
    answer.append(typeof message.data === "string" ? message.data : "");
    resources.countTokens(1);
  },

  done(message) {
    const answer = chat.answerFor(message);
    answer.finish(message);
    const { total_tokens, tokens_per_s, ttft_ms, finish_reason } = message;
    savedStats.remember(connection.sessionId, message.request_id, answer.text,
      { total_tokens, tokens_per_s, ttft_ms, finish_reason });
    endGeneration(message);
  },

  error(message) {
    if (message.code === "events_dropped" && chat.active) {
      // The server's buffer overflowed while this page was away: the answer goes on, with a gap.
      chat.active.warn(message);
      return;
    }
    if (message.code === "unsupported" && message.request_id === undefined && !models.awaiting) {
      // e.g. resources on a server without them: that panel stays empty, the chat works.
      console.info("llmws:", message.message);
      return;
    }
    const generationError = message.request_id !== undefined || Number.isInteger(message.seq);
    if (generationError || (chat.waiting && !models.awaiting)) {
      const answer = message.request_id !== undefined ? chat.answerFor(message) : chat.waiting;
      if (answer) {
        answer.fail(message);
        // The part generated before the error stays in the history: so does the error, here.
        if (answer.text && answer.requestId !== null) {
          savedStats.remember(connection.sessionId, answer.requestId, answer.text,
            { error: { code: message.code, message: message.message } });
        }
        if (answer === chat.waiting) chat.waiting = null;
        endGeneration(message);
        return;
      }
    }
    if (models.awaiting) {
      models.failed(message);
      return;
    }
    if (message.code === "unauthorized") {
      // The server closes next; the token field is where the user can act on it.
      togglePanel(true);
      showTab("server");
      $("server-token").focus();
    }
    toast(errorText(message));
  },

  reset_done() {
    chat.clear();
    writeJSON(PENDING_KEY, null);
    savedStats.forget();
  },

  resources(message) {
    const report = message.resources && typeof message.resources === "object" ? message.resources : message;
    resources.sample(report);
    const engine = report.engine || {};
    if (typeof engine.model === "string") showServerFacts(engine.model, engine.device, engine.max_context);
  },

  models_list(message) {
    models.render(message);
  },
};

// The header's model, device and context; resources reports keep it current (a model that
// finished loading after the welcome, a switch made by the operator).
function showServerFacts(model, device, maxContext) {
  if (model) {
    $("fact-model").textContent = model;
    models.current = model;
  }
  if (device) $("fact-device").textContent = device;
  if (Number.isFinite(maxContext)) $("fact-context").textContent = `${maxContext.toLocaleString("en-US")} tokens`;
}

function endGeneration(message) {
  if (chat.active && (message.request_id === undefined || chat.active.requestId === message.request_id)) {
    chat.active = null;
  }
  if (!chat.active && !chat.waiting) {
    setGenerating(false);
    writeJSON(PENDING_KEY, null);
    if (chat.resetWhenEnded) {
      chat.resetWhenEnded = false;
      connection.send({ type: "reset" });
    }
  }
  // The answer is in the session's history now; its buffered events can go.
  if (Number.isInteger(message.seq) && !chat.restoring) connection.ack(message.seq);
}

function onMessage(message, info = {}) {
  const handler = handlers[message.type] || models.handlers[message.type];
  if (handler) handler(message, info);
  // A generation event: the connection has moved its last seq on (Server tab, "Last event").
  if (Number.isInteger(message.seq)) showLastEvent();
}

// ---------------------------------------------------------------------------------------------
// Connection state

function onState(status) {
  const labels = {
    connecting: "Connecting…",
    connected: "Connected",
    reconnecting: "Reconnecting…",
    offline: "Offline",
  };
  $("status").dataset.state = status.state;
  $("status-text").textContent = labels[status.state];
  const banner = $("banner");
  banner.replaceChildren();
  banner.dataset.state = status.state;
  if (status.state === "reconnecting") {
    const wait = status.retryInS ? ` Next attempt in ${status.retryInS.toFixed(1)} s.` : "";
    banner.append(
      el("strong", "", "Reconnecting…"),
      el("span", "", `The connection dropped; the answer continues when it is back.${wait}`),
    );
    const retry = el("button", "ghost small", "Retry now");
    retry.type = "button";
    retry.addEventListener("click", () => connection.retryNow());
    banner.appendChild(retry);
    banner.hidden = false;
  } else if (status.state === "offline") {
    banner.append(el("strong", "", "Offline."), el("span", "", status.reason || ""));
    const retry = el("button", "ghost small", "Connect");
    retry.type = "button";
    retry.addEventListener("click", () => connectFromForm());
    banner.appendChild(retry);
    banner.hidden = false;
  } else {
    banner.hidden = true;
  }
  $("send").disabled = status.state !== "connected";
  renderConnectionFacts();
}

function renderConnectionFacts() {
  const facts = $("connection-facts");
  facts.replaceChildren();
  const rows = [
    ["State", $("status-text").textContent],
    ["Session", connection.sessionId || "–"],
  ];
  for (const [key, value] of rows) facts.append(el("dt", "", key), el("dd", "", value));
  facts.append(el("dt", "", "Last event"), el("dd", "", ""));
  facts.lastElementChild.id = "fact-last-event";
  showLastEvent();
}

function showLastEvent() {
  const node = $("fact-last-event");
  if (node) node.textContent = String(connection.lastSeq);
}

function connectFromForm() {
  const url = normalizeServerUrl($("server-url").value);
  if (!url) {
    toast("That is not a server address: use host:port or ws://host:port/.");
    return;
  }
  if (url !== connection.url && connection.url) chat.clear(); // another server's conversation
  $("server-url").value = url;
  const token = $("server-token").value.trim();
  writeStored(SERVER_KEY, url);
  writeStored(TOKEN_KEY, token);
  connection.connect(url, token);
  models.updateControls();
}

// ---------------------------------------------------------------------------------------------
// Settings

const SLIDERS = ["temperature", "top_p", "top_k"];

function readSettings() {
  const saved = readJSON(SETTINGS_KEY, {});
  return { ...serverDefaults, ...saved };
}

function showSettings(settings) {
  $("system-prompt").value = settings.system;
  for (const key of [...SLIDERS, "max_new_tokens"]) $(key).value = settings[key];
  for (const key of SLIDERS) $(`${key}-out`).textContent = settings[key];
}

function saveSettings() {
  const settings = {
    system: $("system-prompt").value,
    temperature: Number($("temperature").value),
    top_p: Number($("top_p").value),
    top_k: Math.round(Number($("top_k").value)),
    max_new_tokens: Math.max(1, Math.round(Number($("max_new_tokens").value) || serverDefaults.max_new_tokens)),
  };
  for (const key of SLIDERS) $(`${key}-out`).textContent = settings[key];
  writeJSON(SETTINGS_KEY, settings);
}

// ---------------------------------------------------------------------------------------------
// Panel, tabs and wiring

function showTab(name) {
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.tab === name));
  }
  for (const panel of document.querySelectorAll(".tab")) panel.hidden = panel.id !== `tab-${name}`;
  if (name === "resources") resources.draw();
  if (name === "models") connection.send({ type: "list_models" });
}

function togglePanel(open) {
  const show = open ?? !document.body.classList.contains("panel-open");
  document.body.classList.toggle("panel-open", show);
  document.body.classList.toggle("panel-closed", !show);
  $("panel-toggle").setAttribute("aria-expanded", String(show));
  if (show) resources.draw();
}

async function copyText(text) {
  // navigator.clipboard needs a secure context; a page on http://host:8765 falls back.
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  const area = el("textarea");
  area.value = text;
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.appendChild(area);
  area.select();
  document.execCommand("copy");
  area.remove();
}

const connection = new ResumableConnection({ onMessage, onState });

function init() {
  resources.init();
  showSettings(readSettings());
  for (const id of ["system-prompt", ...SLIDERS, "max_new_tokens"]) $(id).addEventListener("input", saveSettings);
  $("settings-reset").addEventListener("click", () => {
    localStorage.removeItem(SETTINGS_KEY); // back to the server's defaults, sent by nobody
    showSettings(serverDefaults);
  });

  const prompt = $("prompt");
  if (window.matchMedia("(max-width: 600px)").matches) prompt.placeholder = "Message";
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendPrompt();
    }
  });
  prompt.addEventListener("input", () => autosize(prompt));
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    sendPrompt();
  });
  $("stop").addEventListener("click", () => connection.send({ type: "cancel" }));
  $("new-chat").addEventListener("click", newChat);
  $("messages").addEventListener("click", async (event) => {
    const button = event.target.closest("button.copy");
    if (!button) return;
    try {
      await copyText(button.dataset.code);
      button.textContent = "Copied";
    } catch (error) {
      button.textContent = "Copy failed";
      console.warn("llmws: copy failed", error);
    }
    setTimeout(() => (button.textContent = "Copy"), 1500);
  });

  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.addEventListener("click", () => showTab(tab.dataset.tab));
  }
  $("panel-toggle").addEventListener("click", () => togglePanel());
  $("panel-close").addEventListener("click", () => togglePanel(false));
  const narrow = window.matchMedia("(max-width: 899px)");
  document.querySelector(".chat").addEventListener("click", (event) => {
    if (narrow.matches && document.body.classList.contains("panel-open") && event.target === event.currentTarget) {
      togglePanel(false);
    }
  });
  togglePanel(!narrow.matches);

  $("models-refresh").addEventListener("click", () => connection.send({ type: "list_models" }));
  $("download").addEventListener("submit", (event) => {
    event.preventDefault();
    const repo = $("download-repo").value.trim();
    const target = $("download-target").value.trim();
    const message = { type: "download_model", repo };
    if (target) message.target_dir = target;
    models.act(`Asking the server to download ${repo}…`, message);
  });

  // ?token=… fills the token field once and leaves the address bar (and its history).
  const params = new URLSearchParams(location.search);
  let token = readStored(TOKEN_KEY);
  if (params.has("token")) {
    token = params.get("token");
    params.delete("token");
    const query = params.toString();
    history.replaceState(null, "", location.pathname + (query ? `?${query}` : "") + location.hash);
  }
  $("server-url").value = readStored(SERVER_KEY) || pageServerUrl();
  $("server-token").value = token;
  $("connection-form").addEventListener("submit", (event) => {
    event.preventDefault();
    connectFromForm();
  });
  $("server-default").addEventListener("click", () => {
    $("server-url").value = pageServerUrl();
    connectFromForm();
  });
  $("forget-session").addEventListener("click", () => {
    connection.forgetSession();
    chat.clear();
    connectFromForm();
  });
  window.addEventListener("online", () => connection.retryNow());
  setInterval(() => {
    if (!$("tab-resources").hidden && document.body.classList.contains("panel-open")) resources.draw();
  }, 5000);
  connectFromForm();
}

// For tests and debugging from the console.
window.llmws = {
  connection,
  chat,
  dropConnection: () => connection.drop(),
  // The conversation as shown: each answer's raw (unrendered) text, status and token count.
  messages: () => [...chat.messages.querySelectorAll(".msg")].map((node) => {
    const answer = answerOf.get(node);
    if (!answer) return { role: "user", text: node.textContent, status: "sent", pieces: 0 };
    return { role: "assistant", text: answer.text, status: answer.status, pieces: answer.pieces };
  }),
};

init();
