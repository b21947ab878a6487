// Shared pieces of the LyCORIS frontend: node extension registration, a text panel widget and a
// small line chart. Everything coming from files or the server is written with textContent (never
// innerHTML): adapter metadata is user-controlled text.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

export const PANEL_STYLE = `
.lycoris-panel { font: 11px/1.35 monospace; color: var(--input-text, #ddd);
  background: var(--comfy-input-bg, #222); border-radius: 4px; padding: 4px 6px;
  overflow: auto; box-sizing: border-box; white-space: pre-wrap; word-break: break-word; }
.lycoris-panel .lyc-title { font-weight: bold; color: var(--fg-color, #fff); margin: 2px 0; }
.lycoris-panel .lyc-row { display: flex; gap: 6px; }
.lycoris-panel .lyc-key { color: #8ab4f8; flex: 0 0 auto; }
.lycoris-panel .lyc-warn { color: #f6ad55; }
.lycoris-panel .lyc-error { color: #fc8181; }
.lycoris-panel canvas { width: 100%; height: 100%; display: block; }
`;

let styleAdded = false;

function addStyle() {
  if (styleAdded) return;
  const style = document.createElement("style");
  style.textContent = PANEL_STYLE;
  document.head.appendChild(style);
  styleAdded = true;
}

// The frontend's margin around a DOM widget on the canvas (classic node mode), taken from the
// widget's height (the same in frontends 1.32 and 1.45; Vue nodes size widgets to their content).
const WIDGET_MARGIN = 10;
const PANEL_PADDING = 8;  // top + bottom, as in PANEL_STYLE
const CAPTION_LINE = 15;  // one caption line (11px font, line height 1.35)

/**
 * Add a read-only DOM widget (not saved in the workflow) to `node`; returns its root element.
 * `minHeight`: the least height (px) the node lays out for it, or a function giving it.
 */
export function addPanel(node, name, className, minHeight = 120) {
  addStyle();
  const el = document.createElement("div");
  el.className = `lycoris-panel ${className}`;
  el.dataset.lycorisPanel = name;
  node.addDOMWidget(name, "lycoris-panel", el, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => undefined,
    setValue: () => {},
    getMinHeight: typeof minHeight === "function" ? minHeight : () => minHeight,
  });
  return el;
}

/**
 * A panel holding a chart canvas of `chartHeight` px and a caption below it, laid out tall enough
 * for both. `draw(series, options)` draws the chart (see drawLines) and draws it again whenever
 * the canvas changes size (a node resized, a panel shown after being off screen).
 */
export function addChartPanel(node, name, className, chartHeight) {
  const canvas = document.createElement("canvas");
  const caption = document.createElement("div");
  const panel = addPanel(node, name, className, () => chartHeight +
    Math.max(caption.offsetHeight, CAPTION_LINE) + PANEL_PADDING + 2 * WIDGET_MARGIN);
  canvas.style.height = `${chartHeight}px`;
  panel.append(canvas, caption);
  let last = null;
  let drawnWidth = 0;
  const draw = (series, options) => {
    last = [series, options];
    drawnWidth = canvas.clientWidth;
    drawLines(canvas, series, options);
  };
  new ResizeObserver(() => {
    if (last && canvas.clientWidth && canvas.clientWidth !== drawnWidth) draw(...last);
  }).observe(canvas);
  return { panel, canvas, caption, draw };
}

/** GET a JSON route of the pack (under /api); throws the server's `error` text on failure. */
export async function fetchJson(path) {
  const res = await api.fetchApi(path);
  const body = await res.json();
  if (!res.ok) throw new Error(body.error ?? `HTTP ${res.status}`);
  return body;
}

/** Replace the content of a panel by sections of rows: [{title, rows: [[key, value, cls?]]}]. */
export function renderSections(el, sections) {
  el.replaceChildren();
  for (const section of sections) {
    if (section.title) {
      const t = document.createElement("div");
      t.className = `lyc-title ${section.cls ?? ""}`;
      t.textContent = section.title;
      el.appendChild(t);
    }
    for (const [key, value, cls] of section.rows ?? []) {
      const row = document.createElement("div");
      row.className = `lyc-row ${cls ?? ""}`;
      if (key !== null && key !== undefined && key !== "") {
        const k = document.createElement("span");
        k.className = "lyc-key";
        k.textContent = `${key}:`;
        row.appendChild(k);
      }
      const v = document.createElement("span");
      v.textContent = String(value);
      row.appendChild(v);
      el.appendChild(row);
    }
  }
}

/**
 * Panel section of the reader compatibility lines (`readers` of the /lycoris/metadata answer:
 * [{reader, status, text}], one per reader); lines other than "reads it" are highlighted.
 */
export function readersSection(readers) {
  if (!readers?.length) return null;
  return { title: "readers", rows: readers.map((r) => ["", r.text, r.status === "ok" ? "" : "lyc-warn"]) };
}

/** "a ×3, b ×1" for a {value: count} object, largest count first. */
export function counts(obj) {
  const entries = Object.entries(obj ?? {});
  if (!entries.length) return "-";
  entries.sort((a, b) => b[1] - a[1] || String(a[0]).localeCompare(String(b[0])));
  return entries.map(([k, n]) => `${k} ×${n}`).join(", ");
}

/** Call `fn(value)` after the widget `name` of `node` changes (keeps the existing callback). */
export function onWidgetChange(node, name, fn) {
  const widget = node.widgets?.find((w) => w.name === name);
  if (!widget) return null;
  const previous = widget.callback;
  widget.callback = function (value, ...rest) {
    const r = previous?.apply(this, [value, ...rest]);
    fn(widget.value);
    return r;
  };
  return widget;
}

/**
 * Draw y(x) lines (or dots) on a canvas. `series`: [{xs, ys, color, dots?}]; axes labelled with
 * the ranges.
 * The canvas is sized to its element's box times the device pixel ratio.
 */
export function drawLines(canvas, series, { title = "", xLabel = "", yLabel = "" } = {}) {
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(50, canvas.clientWidth || 200);
  const h = Math.max(40, canvas.clientHeight || 100);
  canvas.width = w * dpr;
  canvas.height = h * dpr;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const pts = series.flatMap((s) => s.xs.map((x, i) => [x, s.ys[i]])).filter(([x, y]) =>
    Number.isFinite(x) && Number.isFinite(y));
  ctx.font = "10px monospace";
  ctx.fillStyle = "#aaa";
  if (title) ctx.fillText(title, 4, 11);
  if (!pts.length) {
    ctx.fillText("no data yet", 4, h / 2);
    return;
  }
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const pad = { l: 40, r: 6, t: 16, b: 16 };
  const sx = (x) => pad.l + ((x - x0) / (x1 - x0)) * (w - pad.l - pad.r);
  const sy = (y) => h - pad.b - ((y - y0) / (y1 - y0)) * (h - pad.t - pad.b);
  ctx.strokeStyle = "#555";
  ctx.beginPath();
  ctx.moveTo(pad.l, pad.t);
  ctx.lineTo(pad.l, h - pad.b);
  ctx.lineTo(w - pad.r, h - pad.b);
  ctx.stroke();
  const fmt = (v) => (Math.abs(v) >= 100 || Number.isInteger(v) ? String(Math.round(v * 100) / 100)
    : v.toPrecision(3));
  ctx.fillText(fmt(y1), 2, pad.t + 8);
  ctx.fillText(fmt(y0), 2, h - pad.b);
  ctx.fillText(`${fmt(x0)}${xLabel ? " " + xLabel : ""}`, pad.l, h - 4);
  const right = `${fmt(x1)}`;
  ctx.fillText(right, w - pad.r - ctx.measureText(right).width, h - 4);
  if (yLabel) ctx.fillText(yLabel, w - pad.r - ctx.measureText(yLabel).width, 11);
  for (const s of series) {
    ctx.strokeStyle = ctx.fillStyle = s.color ?? "#4fd1c5";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    s.xs.forEach((x, i) => {
      const p = [sx(x), sy(s.ys[i])];
      if (s.dots) {
        ctx.moveTo(p[0] + 2.5, p[1]);
        ctx.arc(p[0], p[1], 2.5, 0, 2 * Math.PI);
      } else if (i === 0) ctx.moveTo(...p);
      else ctx.lineTo(...p);
    });
    if (s.dots) ctx.fill();
    else ctx.stroke();
  }
}

/** Wrap `target[method]` so that `fn` runs after the existing implementation (same arguments). */
export function chain(target, method, fn) {
  const previous = target[method];
  target[method] = function (...args) {
    const r = previous?.apply(this, args);
    fn.apply(this, args);
    return r;
  };
}

/** Register a frontend extension that calls `setup(node, nodeType)` on every new node of `types`. */
export function registerNodeExtension(name, types, setup, extra = {}) {
  app.registerExtension({
    name,
    ...extra,
    async beforeRegisterNodeDef(nodeType, nodeData) {
      if (!types.includes(nodeData.name)) return;
      chain(nodeType.prototype, "onNodeCreated", function () { setup(this, nodeData.name); });
    },
  });
}
