// Small time-series charts on a canvas: the last few minutes of one or more series.
"use strict";

const MIN_SPAN_S = 60;

class TimeChart {
  // `options`: title, unit ("%", "GB", "tok/s"), max (fixed y maximum, or null to fit), windowS.
  constructor(container, options) {
    this.options = { unit: "", max: null, windowS: 300, ...options };
    this.series = new Map(); // label -> {color, points: [[t, value]]}
    this.root = document.createElement("figure");
    this.root.className = "chart";
    const caption = document.createElement("figcaption");
    const title = document.createElement("span");
    title.className = "chart-title";
    title.textContent = this.options.title;
    this.legend = document.createElement("span");
    this.legend.className = "chart-legend";
    caption.append(title, this.legend);
    this.canvas = document.createElement("canvas");
    this.canvas.height = 90;
    this.root.append(caption, this.canvas);
    container.appendChild(this.root);
  }

  add(label, color, value, time) {
    if (typeof value !== "number" || !Number.isFinite(value)) return;
    if (!this.series.has(label)) this.series.set(label, { color, points: [] });
    const points = this.series.get(label).points;
    points.push([time, value]);
    const oldest = time - this.options.windowS * 1000;
    while (points.length && points[0][0] < oldest) points.shift();
  }

  format(value) {
    const unit = this.options.unit;
    const digits = Math.abs(value) >= 100 ? 0 : 1;
    return value.toFixed(digits) + (unit === "%" ? "%" : unit ? " " + unit : "");
  }

  draw(now) {
    this.legend.replaceChildren();
    for (const [label, { color, points }] of this.series) {
      const item = document.createElement("span");
      const swatch = document.createElement("i");
      swatch.style.background = color;
      const last = points.length ? this.format(points[points.length - 1][1]) : "–";
      item.append(swatch, document.createTextNode(`${label} ${last}`));
      this.legend.appendChild(item);
    }
    const ratio = window.devicePixelRatio || 1;
    const width = this.canvas.clientWidth || 280;
    const height = this.canvas.clientHeight || 90;
    if (this.canvas.width !== Math.round(width * ratio)) this.canvas.width = Math.round(width * ratio);
    this.canvas.height = Math.round(height * ratio);
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);

    const styles = getComputedStyle(this.root);
    const grid = styles.getPropertyValue("--chart-grid").trim() || "#e5e7eb";
    const muted = styles.getPropertyValue("--muted").trim() || "#6b7280";
    let max = this.options.max;
    if (max === null) {
      max = 0;
      for (const { points } of this.series.values()) for (const [, v] of points) max = Math.max(max, v);
      max = max > 0 ? max * 1.15 : 1;
    }
    const pad = { top: 16, bottom: 6, left: 2, right: 2 }; // the scale's label sits above the plot
    const plotH = height - pad.top - pad.bottom;
    const plotW = width - pad.left - pad.right;
    ctx.strokeStyle = grid;
    ctx.lineWidth = 1;
    for (let k = 0; k <= 2; k += 1) {
      const y = Math.round(pad.top + (plotH * k) / 2) + 0.5;
      ctx.beginPath();
      ctx.moveTo(pad.left, y);
      ctx.lineTo(width - pad.right, y);
      ctx.stroke();
    }
    ctx.fillStyle = muted;
    ctx.font = "10px system-ui, sans-serif";
    ctx.textAlign = "right";
    ctx.fillText(this.format(max), width - 4, pad.top - 5);
    // The time axis spans the data seen so far, at least a minute, at most the window.
    let oldest = now;
    for (const { points } of this.series.values()) if (points.length) oldest = Math.min(oldest, points[0][0]);
    const spanMs = Math.min(Math.max(now - oldest, MIN_SPAN_S * 1000), this.options.windowS * 1000);
    ctx.textAlign = "left";
    ctx.fillText(`last ${Math.ceil(spanMs / 60000)} min`, 4, pad.top - 5);

    if (![...this.series.values()].some((s) => s.points.length)) {
      ctx.textAlign = "center";
      ctx.fillText("not reported by the server", width / 2, height / 2 + 3);
      return;
    }
    const start = now - spanMs;
    const x = (t) => pad.left + ((t - start) / spanMs) * plotW;
    const y = (v) => pad.top + plotH - (Math.min(v, max) / max) * plotH;
    for (const { color, points } of this.series.values()) {
      if (!points.length) continue;
      ctx.beginPath();
      points.forEach(([t, v], n) => (n ? ctx.lineTo(x(t), y(v)) : ctx.moveTo(x(t), y(v))));
      ctx.strokeStyle = color;
      ctx.lineWidth = 1.75;
      ctx.lineJoin = "round";
      ctx.stroke();
      // A light fill under the line makes a single series easier to read.
      ctx.lineTo(x(points[points.length - 1][0]), pad.top + plotH);
      ctx.lineTo(x(points[0][0]), pad.top + plotH);
      ctx.closePath();
      ctx.globalAlpha = 0.08;
      ctx.fillStyle = color;
      ctx.fill();
      ctx.globalAlpha = 1;
    }
  }
}
