// Small helpers shared by the page's scripts: DOM building, numbers, storage, messages.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "llmws.token";

const ERROR_TEXT = {
  context_too_long: (m) =>
    `The conversation is too long for this model` +
    (m.input_length ? ` (${m.input_length} tokens, at most ${m.max_context})` : "") +
    `. Start a new chat or send a shorter message.`,
  busy: () => "The server is busy right now. Try again in a moment.",
  forbidden: (m) => `Not allowed: ${m.message}`,
  unauthorized: () => "The server needs a valid token: enter it under Server.",
  no_model: () => "The server has no model loaded.",
  interrupted: () => "The server restarted while answering; the answer stops here.",
  unsupported: (m) => `The server does not support this: ${m.message}`,
  events_dropped: () => "Part of this answer was lost while the page was away (the server keeps a limited buffer).",
};

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function errorText(message) {
  const describe = ERROR_TEXT[message.code];
  return describe ? describe(message) : message.message || `Error (${message.code || "unknown"})`;
}

function formatBytes(bytes) {
  if (!Number.isFinite(bytes)) return "";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value.toFixed(value >= 100 || unit === 0 ? 0 : 1)} ${units[unit]}`;
}

// The first of `keys` in `object` that holds a finite number.
function pick(object, ...keys) {
  if (!object || typeof object !== "object") return undefined;
  for (const key of keys) {
    const value = object[key];
    if (typeof value === "number" && Number.isFinite(value)) return value;
  }
  return undefined;
}

// The token is kept for this tab only (sessionStorage); the rest in localStorage.
function storageFor(key) {
  return key === TOKEN_KEY ? window.sessionStorage : window.localStorage;
}

function readStored(key) {
  try {
    return storageFor(key).getItem(key) || "";
  } catch {
    return "";
  }
}

function writeStored(key, value) {
  try {
    storageFor(key).setItem(key, value);
  } catch {
    // Not remembered (private browsing, full quota); still used by this page.
  }
}

function readJSON(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value ?? fallback;
  } catch {
    return fallback;
  }
}

function writeJSON(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch {
    // Private browsing or a full quota: the page works, only reload-resume is lost.
  }
}

let toastTimer = null;
function toast(text) {
  const node = $("toast");
  node.textContent = text;
  node.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (node.hidden = true), 5000);
}
