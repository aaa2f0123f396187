// A WebSocket to llmwsd that survives drops: it reconnects with backoff, resumes
// its session with `last_seq`, and passes each generation event on exactly once.
"use strict";

const SESSION_KEY = "llmws.session"; // {id, ackedSeq, url}: what a reload resumes
const BACKOFF_S = [0.5, 1, 2, 4, 8, 10];
const LIVENESS_S = 25; // with no frame for this long, ping; with none after another LIVENESS_S, reconnect
// Close codes after which retrying cannot help: policy (bad token, hello timeout).
const FINAL_CLOSE_CODES = new Set([1008]);

// "host:port", "http://host/…" or "ws://host/…" -> a ws(s):// URL.
function normalizeServerUrl(text) {
  let url = text.trim();
  if (!url) return "";
  if (!/^[a-z]+:\/\//i.test(url)) url = (location.protocol === "https:" ? "wss://" : "ws://") + url;
  url = url.replace(/^http(s?):\/\//i, "ws$1://");
  try {
    const parsed = new URL(url);
    if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") return "";
    return parsed.href;
  } catch {
    return "";
  }
}

function pageServerUrl() {
  if (location.protocol !== "http:" && location.protocol !== "https:") return "ws://127.0.0.1:8765/";
  return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/";
}

class ResumableConnection {
  // onMessage(message, info) gets every message once, generation events in seq order; for
  // `welcome`, info says whether this is the page's first (`fresh`) and whether the server no
  // longer had the session (`lostSession`). onState({state, attempt, retryInS, reason}) gets
  // "connecting", "connected", "reconnecting" and "offline".
  constructor({ onMessage, onState }) {
    this.onMessage = onMessage;
    this.onState = onState;
    this.socket = null;
    this.url = "";
    this.token = "";
    const saved = readJSON(SESSION_KEY, {});
    this.sessionId = typeof saved.id === "string" ? saved.id : null;
    this.ackedSeq = Number.isInteger(saved.ackedSeq) ? saved.ackedSeq : 0;
    this.savedUrl = saved.url || "";
    this.lastSeq = this.ackedSeq; // the newest event this page has handled
    this.welcomed = false; // the current socket got its welcome
    this.welcomedOnce = false; // false until the first welcome of this page load
    this.attempt = 0;
    this.retryTimer = null;
    this.livenessTimer = null;
    this.lastFrameAt = 0;
  }

  get connected() {
    return this.socket !== null && this.socket.readyState === WebSocket.OPEN && this.welcomed;
  }

  connect(url, token) {
    if (url !== this.savedUrl && this.savedUrl) this.forgetSession(); // another server's session
    this.url = url;
    this.token = token;
    this.savedUrl = url;
    this.attempt = 0;
    this.stop();
    this.open();
  }

  // Ends the connection for good (until the next connect()).
  stop() {
    clearTimeout(this.retryTimer);
    clearInterval(this.livenessTimer);
    if (this.socket) {
      const socket = this.socket;
      this.socket = null;
      socket.onclose = socket.onmessage = socket.onerror = null;
      socket.close(1000, "client closed");
    }
  }

  forgetSession() {
    this.sessionId = null;
    this.ackedSeq = 0;
    this.lastSeq = 0;
    this.welcomedOnce = true; // nothing to restore: a new session starts empty
    this.save();
  }

  // Drops the socket as a network failure would and starts reconnecting at once, without
  // waiting for a closing handshake that a dead network never completes. Also a test hook.
  drop() {
    if (!this.socket) return;
    const socket = this.socket;
    socket.onclose = socket.onmessage = socket.onerror = null;
    socket.close(4000, "dropped by the page");
    this.closed({ code: 4000, reason: "" });
  }

  retryNow() {
    if (this.socket) return;
    clearTimeout(this.retryTimer);
    this.open();
  }

  send(message) {
    if (!this.connected) return false;
    this.socket.send(JSON.stringify(message));
    return true;
  }

  // Lets the server drop buffered events up to `seq`: they are in its history now.
  ack(seq) {
    if (!Number.isInteger(seq) || seq <= this.ackedSeq) return;
    if (this.send({ type: "ack", seq })) {
      this.ackedSeq = seq;
      this.save();
    }
  }

  save() {
    writeJSON(SESSION_KEY, { id: this.sessionId, ackedSeq: this.ackedSeq, url: this.savedUrl });
  }

  open() {
    if (!this.url) {
      this.onState({ state: "offline", reason: "No server address: set one under Server." });
      return;
    }
    this.welcomed = false;
    this.onState({ state: this.attempt ? "reconnecting" : "connecting", attempt: this.attempt });
    let socket;
    try {
      socket = new WebSocket(this.url);
    } catch (error) {
      this.onState({ state: "offline", reason: `Cannot connect to ${this.url}: ${error.message}` });
      return;
    }
    this.socket = socket;
    socket.onopen = () => {
      // After a drop within this page, ask for what came after the last event shown. On a
      // fresh load, ask from the last acknowledged one: the part of an unfinished answer that
      // this page has not seen yet is still in the server's buffer.
      const hello = {};
      if (this.sessionId) {
        hello.session_id = this.sessionId;
        hello.last_seq = this.welcomedOnce ? this.lastSeq : this.ackedSeq;
      }
      if (this.token) hello.token = this.token;
      socket.send(JSON.stringify(hello));
      this.lastFrameAt = Date.now();
      clearInterval(this.livenessTimer);
      this.livenessTimer = setInterval(() => this.checkLiveness(), 5000);
    };
    socket.onmessage = (event) => this.receive(event.data);
    socket.onclose = (event) => this.closed(event);
  }

  checkLiveness() {
    const quietS = (Date.now() - this.lastFrameAt) / 1000;
    if (quietS > 2 * LIVENESS_S) this.drop();
    else if (quietS > LIVENESS_S) this.send({ type: "ping" });
  }

  receive(data) {
    this.lastFrameAt = Date.now();
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      console.warn("llmws: a frame that is not JSON", data);
      return;
    }
    if (message === null || typeof message !== "object") return;
    if (message.type === "welcome") {
      this.welcome(message);
      return;
    }
    if (Number.isInteger(message.seq)) {
      if (message.seq <= this.lastSeq) return; // already shown: a replay overlap
      if (message.seq > this.lastSeq + 1 && this.welcomedOnce) {
        console.warn(`llmws: events ${this.lastSeq + 1}..${message.seq - 1} are missing`);
      }
      this.lastSeq = message.seq;
    }
    this.onMessage(message);
  }

  welcome(message) {
    const fresh = !this.welcomedOnce;
    if (!message.resumed || message.session_id !== this.sessionId) {
      // A new session (first visit, expired, or a server that lost it): seqs start over.
      this.lastSeq = 0;
      this.ackedSeq = 0;
    }
    const lostSession = this.sessionId !== null && !message.resumed;
    this.sessionId = message.session_id;
    this.welcomedOnce = true;
    this.welcomed = true;
    this.attempt = 0;
    this.save();
    this.onState({ state: "connected" });
    this.onMessage(message, { fresh, lostSession });
  }

  closed(event) {
    this.socket = null;
    this.welcomed = false;
    clearInterval(this.livenessTimer);
    const reason = event.reason || `connection closed (code ${event.code})`;
    if (FINAL_CLOSE_CODES.has(event.code) || /taken over|another connection/i.test(reason)) {
      this.onState({ state: "offline", reason });
      return;
    }
    const delay = BACKOFF_S[Math.min(this.attempt, BACKOFF_S.length - 1)] * (0.8 + Math.random() * 0.4);
    this.attempt += 1;
    this.onState({ state: "reconnecting", attempt: this.attempt, retryInS: delay, reason });
    this.retryTimer = setTimeout(() => this.open(), delay * 1000);
  }
}
