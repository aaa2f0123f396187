// The resources panel: live charts of memory, utilization and generation speed.
"use strict";

const RESOURCES_INTERVAL_S = 2;
const BLUE = "#2563eb";
const GREEN = "#16a34a";
const GPU_COLORS = ["#db2777", "#ea580c", "#7c3aed", "#0891b2"];

// Host RAM in GB: from `host`, or from the top-level keys that older servers send
// (which llmwsd uses for the model's GPU when it runs on one).
function hostMemory(report) {
  const host = report.host || {};
  let total = pick(host, "ram_total_gb");
  let used = pick(host, "ram_used_gb");
  const topLevel = typeof report.device !== "string" || !report.device.startsWith("cuda");
  if ((total === undefined || used === undefined) && topLevel) {
    total = pick(report, "total_gb");
    const free = pick(report, "free_gb");
    used = total !== undefined && free !== undefined ? total - free : undefined;
  }
  return total > 0 && used !== undefined ? { total, used } : null;
}

// The server's GB are GiB; small figures read better in MB.
function gigabytes(value) {
  return value >= 1 ? `${value.toFixed(1)} GB` : `${Math.round(value * 1024)} MB`;
}

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
    const gpus = Array.isArray(report.gpus) ? report.gpus : [];
    const ram = hostMemory(report);
    if (ram) memory.add("RAM", BLUE, (ram.used / ram.total) * 100, now);
    load.add("CPU", BLUE, pick(host, "cpu_percent") ?? pick(report, "cpu_percent"), now);
    gpus.forEach((gpu, n) => {
      const label = `GPU ${gpu.index ?? n}`;
      const color = GPU_COLORS[n % GPU_COLORS.length];
      const used = pick(gpu, "memory_used_gb");
      const total = pick(gpu, "memory_total_gb");
      if (total > 0 && used !== undefined) memory.add(label, color, (used / total) * 100, now);
      load.add(label, color, pick(gpu, "utilization_percent", "utilization"), now);
    });
    const engine = report.engine || {};
    // llmwsd's tokens_per_s is an average over the last minute: it stays up for a while after
    // the last answer. With nothing generating (engine.active 0), the speed is 0.
    const idle = pick(engine, "active") === 0;
    let rate = pick(engine, "tokens_per_s") ?? pick(report, "tokens_per_s");
    if (rate !== undefined) {
      this.serverReportsRate = true;
      rate = idle ? 0 : rate;
      speed.add("server", GREEN, rate, now);
    } else if (this.lastRate && !this.serverReportsRate) {
      const seconds = (now - this.lastRate[0]) / 1000;
      // The page's own count: the tokens received since the previous report (replays included).
      if (seconds > 0) rate = idle ? 0 : (this.tokensSeen - this.lastRate[1]) / seconds;
      if (rate !== undefined) speed.add("this chat", GREEN, rate, now);
    }
    this.lastRate = [now, this.tokensSeen];
    this.renderFacts(report, gpus, engine, ram, idle ? null : rate);
    if (!$("tab-resources").hidden) this.draw();
  },

  // `rate`: the generation speed to show, null when nothing is generating.
  renderFacts(report, gpus, engine, ram, rate) {
    const rows = [];
    const host = report.host || {};
    if (report.device) rows.push(["Device", report.device]);
    if (ram) rows.push(["RAM", `${gigabytes(ram.used)} used of ${gigabytes(ram.total)}`]);
    const rss = pick(host, "rss_gb");
    if (rss !== undefined) rows.push(["Server process", gigabytes(rss)]);
    const cores = pick(host, "cpu_count");
    if (cores !== undefined) rows.push(["CPU cores", String(cores)]);
    gpus.forEach((gpu, n) => {
      const used = pick(gpu, "memory_used_gb");
      const total = pick(gpu, "memory_total_gb");
      const parts = [gpu.name || "GPU"];
      if (used !== undefined && total !== undefined) parts.push(`${gigabytes(used)} of ${gigabytes(total)}`);
      const temperature = pick(gpu, "temperature_c");
      if (temperature !== undefined) parts.push(`${Math.round(temperature)} °C`);
      rows.push([`GPU ${gpu.index ?? n}`, parts.join(" · ")]);
    });
    if (!gpus.length && typeof report.gpu_status === "string") rows.push(["GPU", report.gpu_status]);
    for (const [key, label] of [["active", "Generating"], ["queued", "Queued"], ["max_context", "Max context"]]) {
      const value = pick(engine, key);
      if (value !== undefined) rows.push([label, value.toLocaleString("en-US")]);
    }
    if (rate === null) rows.push(["Speed", "idle"]);
    else if (rate !== undefined) rows.push(["Speed", `${rate.toFixed(1)} tok/s`]);
    const facts = $("resource-facts");
    facts.replaceChildren();
    for (const [key, value] of rows) facts.append(el("dt", "", key), el("dd", "", value));
  },

  draw() {
    const now = Date.now();
    for (const chart of Object.values(this.charts)) chart.draw(now);
  },
};
