// The resources panel: live charts of memory, utilization and generation speed.
"use strict";

const RESOURCES_INTERVAL_S = 2;

const resources = {
  tokensSeen: 0,
  lastRate: null, // [time, tokensSeen] of the previous sample: the page's own tokens/s
  serverReportsRate: false, // once it does, the page's own count is not charted
  charts: null,

  init() {
    const box = $("charts");
    this.charts = {
      memory: new TimeChart(box, { title: "Memory used", unit: "%", max: 100 }),
      load: new TimeChart(box, { title: "Utilization", unit: "%", max: 100 }),
      speed: new TimeChart(box, { title: "Generation speed", unit: "tok/s" }),
    };
  },

  countTokens(n) {
    this.tokensSeen += n;
  },

  // Adds one resources report to the charts; any key may be missing.
  sample(report) {
    const now = Date.now();
    const { memory, load, speed } = this.charts;
    const host = report.host || {};
    const total = pick(report, "total_gb");
    const free = pick(report, "free_gb");
    const device = typeof report.device === "string" ? report.device : "device";
    if (total > 0 && free !== undefined) {
      memory.add(device.startsWith("cuda") ? device.toUpperCase() : "RAM", "#2563eb", ((total - free) / total) * 100, now);
    }
    load.add("CPU", "#2563eb", pick(host, "cpu_percent", "cpu_util") ?? pick(report, "cpu_percent"), now);
    const gpus = Array.isArray(report.gpus) ? report.gpus : [];
    const colors = ["#db2777", "#16a34a", "#ea580c", "#7c3aed"];
    gpus.forEach((gpu, n) => {
      const label = `GPU ${gpu.index ?? n}`;
      const color = colors[n % colors.length];
      const used = pick(gpu, "memory_used_gb", "used_gb");
      const gpuTotal = pick(gpu, "memory_total_gb", "total_gb");
      if (gpuTotal > 0 && used !== undefined && !device.startsWith("cuda")) {
        memory.add(label, color, (used / gpuTotal) * 100, now);
      }
      load.add(label, color, pick(gpu, "utilization_percent", "utilization", "gpu_util", "util_percent"), now);
    });
    const engine = report.engine || {};
    const serverRate = pick(engine, "tokens_per_s", "tokens_per_second") ?? pick(report, "tokens_per_s");
    if (serverRate !== undefined) {
      this.serverReportsRate = true;
      speed.add("server", "#16a34a", serverRate, now);
    } else if (this.lastRate && !this.serverReportsRate) {
      const seconds = (now - this.lastRate[0]) / 1000;
      if (seconds > 0) speed.add("this chat", "#16a34a", (this.tokensSeen - this.lastRate[1]) / seconds, now);
    }
    this.lastRate = [now, this.tokensSeen];
    this.renderFacts(report, gpus, engine);
    if (!$("tab-resources").hidden) this.draw();
  },

  renderFacts(report, gpus, engine) {
    const rows = [];
    const gb = (v) => (v >= 1 ? `${v.toFixed(1)} GB` : `${Math.round(v * 1024)} MB`); // the server's GB are GiB
    const host = report.host || {};
    if (report.device) rows.push(["Device", report.device]);
    const total = pick(report, "total_gb");
    const free = pick(report, "free_gb");
    if (total !== undefined && free !== undefined) rows.push(["Memory", `${gb(total - free)} used of ${gb(total)}`]);
    const rss = pick(host, "rss_gb");
    if (rss !== undefined) rows.push(["Server process", gb(rss)]);
    const cores = pick(host, "cpu_count");
    if (cores !== undefined) rows.push(["CPU cores", String(cores)]);
    gpus.forEach((gpu, n) => {
      const used = pick(gpu, "memory_used_gb", "used_gb");
      const gpuTotal = pick(gpu, "memory_total_gb", "total_gb");
      const memoryText = used !== undefined && gpuTotal !== undefined ? ` · ${gb(used)} of ${gb(gpuTotal)}` : "";
      rows.push([`GPU ${gpu.index ?? n}`, `${gpu.name || "GPU"}${memoryText}`]);
    });
    for (const [key, label] of [["active", "Generating"], ["queued", "Queued"], ["max_context", "Max context"]]) {
      const value = pick(engine, key);
      if (value !== undefined) rows.push([label, value.toLocaleString("en-US")]);
    }
    const facts = $("resource-facts");
    facts.replaceChildren();
    for (const [key, value] of rows) facts.append(el("dt", "", key), el("dd", "", value));
  },

  draw() {
    const now = Date.now();
    for (const chart of Object.values(this.charts)) chart.draw(now);
  },
};
