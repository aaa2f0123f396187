// The models panel: the server's models, and switch/download/delete where the server allows it.
"use strict";

const models = {
  current: null, // the model the server has loaded, by name
  forbidden: false, // the server refused model management to this client
  awaiting: null, // the management action waiting for its answer, as text

  canManage() {
    return Boolean(connection.token) && !this.forbidden;
  },

  updateControls() {
    const manage = this.canManage();
    $("download").hidden = !manage;
    for (const node of document.querySelectorAll(".model-actions")) node.hidden = !manage;
    $("models-note").hidden = manage || this.forbidden;
  },

  say(text, kind = "info") {
    const node = $("models-message");
    node.textContent = text;
    node.dataset.kind = kind;
    node.hidden = !text;
  },

  render(message) {
    const list = $("models");
    list.replaceChildren();
    const entries = Array.isArray(message.models) ? message.models : [];
    if (!entries.length) list.appendChild(el("li", "muted", "No models found in the server's model folders."));
    for (const model of entries) {
      const name = String(model.name ?? model.path ?? "?");
      const loaded = model.loaded === true || name === this.current;
      const item = el("li", loaded ? "model loaded" : "model");
      const head = el("div", "model-head");
      head.appendChild(el("span", "model-name", name));
      if (loaded) head.appendChild(el("span", "badge", "loaded"));
      item.appendChild(head);
      const size = Number.isFinite(model.size_bytes) ? formatBytes(model.size_bytes)
        : Number.isFinite(model.size_mb) ? formatBytes(model.size_mb * 1e6)
        : Number.isFinite(model.size_gb) ? formatBytes(model.size_gb * 1e9) : "";
      const details = [size, model.architecture, model.dtype,
        Number.isFinite(model.context_length) ? `${model.context_length.toLocaleString("en-US")} ctx` : ""];
      item.appendChild(el("div", "model-details", details.filter(Boolean).join(" · ")));
      const actions = el("div", "model-actions");
      if (!loaded) {
        actions.append(
          this.button("Switch to", () => this.act(`Switching to ${name}…`, { type: "switch_model", model: name })),
          this.button("Delete", () => {
            if (confirm(`Delete the model ${name} from the server?`)) {
              this.act(`Deleting ${name}…`, { type: "delete_model", model_name: name });
            }
          }, "danger"),
        );
      }
      item.appendChild(actions);
      list.appendChild(item);
    }
    this.updateControls();
  },

  button(text, onClick, kind = "ghost") {
    const node = el("button", `${kind} small`, text);
    node.type = "button";
    node.addEventListener("click", onClick);
    return node;
  },

  act(text, message) {
    if (!connection.send(message)) {
      this.say("Not connected.", "error");
      return;
    }
    this.awaiting = text;
    this.say(text);
  },

  failed(message) {
    this.awaiting = null;
    $("download-progress").hidden = true;
    if (message.code === "forbidden") {
      this.forbidden = true;
      this.updateControls();
      this.say(`The server does not allow model management for this client: ${message.message}`, "error");
    } else {
      this.say(errorText(message), "error");
    }
  },

  progress(message) {
    const done = pick(message, "downloaded_bytes", "bytes_done", "done_bytes", "downloaded");
    const total = pick(message, "total_bytes", "bytes_total", "total");
    let percent = pick(message, "percent", "progress");
    if (percent === undefined && done !== undefined && total > 0) percent = (done / total) * 100;
    $("download-progress").hidden = false;
    $("download-bar").style.width = `${Math.max(0, Math.min(100, percent ?? 0))}%`;
    const parts = [];
    if (message.file) parts.push(String(message.file));
    if (done !== undefined) parts.push(total ? `${formatBytes(done)} of ${formatBytes(total)}` : formatBytes(done));
    if (percent !== undefined) parts.push(`${percent.toFixed(0)}%`);
    $("download-text").textContent = parts.join(" · ") || "Downloading…";
  },

  handlers: {
    model_switched(message) {
      models.awaiting = null;
      const name = message.model || message.name || "";
      models.say(`Now serving ${name}.`);
      showServerFacts(name);
      connection.send({ type: "list_models" });
    },
    model_deleted(message) {
      models.awaiting = null;
      models.say(`Deleted ${message.model_name || message.model || "the model"}.`);
      connection.send({ type: "list_models" });
    },
    download_started() {
      models.awaiting = null;
      models.say("Download started.");
      models.progress({});
    },
    download_progress(message) {
      models.progress(message);
    },
    log(message) {
      if (message.message) $("download-text").textContent = String(message.message);
    },
    download_done(message) {
      $("download-progress").hidden = true;
      models.say(`Downloaded ${message.model || message.name || "the model"}.`);
      connection.send({ type: "list_models" });
    },
  },
};
