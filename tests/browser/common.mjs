// Shared by the browser scripts: headless Debian Chromium through playwright-core (no browser
// download), the ComfyUI page loaded and ready, a JSON result line, screenshots.
// env: PLAYWRIGHT_CORE_DIR  folder whose node_modules holds playwright-core (.cache/node)
//      CHROMIUM             browser binary (default /usr/bin/chromium)
import { createRequire } from "node:module";
import path from "node:path";
import fs from "node:fs";
import os from "node:os";

const require = createRequire(path.resolve(process.env.PLAYWRIGHT_CORE_DIR ?? ".", "package.json"));
const { chromium } = require("playwright-core");

// As root on a machine whose network is closed: no sandbox, no background connections.
const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--disable-dev-shm-usage"];

/**
 * How the frontend draws nodes: "classic" (LiteGraph canvas; DOM widgets float over it) or "vue"
 * (Nodes 2.0: every node is a Vue component, DOM widgets live inside it). Frontend 1.32 has
 * Nodes 2.0 as an experiment, 1.45 as an option (off by default on a local install).
 */
export const MODES = ["classic", "vue"];

/**
 * Set the node mode as a user setting through the server's settings route before the page loads
 * (the frontend reads it at start; no switch under a loaded graph).
 */
async function setNodeMode(url, mode) {
  if (!MODES.includes(mode)) throw new Error(`mode ${mode}: one of ${MODES.join(", ")}`);
  const res = await fetch(new URL("api/settings/Comfy.VueNodes.Enabled", url), {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(mode === "vue"),
  });
  if (!res.ok) throw new Error(`setting the node mode: HTTP ${res.status}`);
}

/**
 * Open the ComfyUI page at `url` in node `mode`; resolves when the frontend has opened its first
 * workflow and the pack's node types exist, with the graph cleared.
 */
export async function openComfy(url, mode = "classic") {
  await setNodeMode(url, mode);
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "lycoris-chromium-"));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: FLAGS,
    headless: true,
    viewport: { width: 1280, height: 860 },
  });
  const log = [];
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("console", (m) => { if (m.type() === "error") log.push(`console: ${m.text()}`); });
  page.on("pageerror", (e) => log.push(`pageerror: ${e.message}`));
  const close = async () => {
    await context.close();
    fs.rmSync(userDataDir, { recursive: true, force: true });
  };
  try {
    await page.goto(url, { waitUntil: "domcontentloaded", timeout: 120_000 });
    // Ready = the frontend has opened its first workflow (the default graph): before that, a graph
    // cleared here would be replaced by it (frontend 1.45 opens it after app.setup, behind its
    // loading spinner; 1.32 right after).
    await page.waitForFunction(() => {
      const app = window.comfyAPI?.app?.app;
      const workspace = app?.extensionManager;
      return app?.graph && app?.canvas && window.LiteGraph?.registered_node_types?.LoadLoKr &&
        workspace?.workflow?.activeWorkflow && !workspace.spinner;
    }, null, { timeout: 120_000 });
    await page.evaluate(() => { window.comfyAPI.app.app.graph.clear(); });
  } catch (e) {
    await close();
    throw e;
  }
  return { page, log, close };
}

/** Run `body(page, result)` on a fresh ComfyUI page in node `mode`; print the JSON result; exit 0
 * only if ok. The result names the frontend's version and node mode as the page reports them. */
export async function runScenario(url, shot, body, mode = "classic") {
  const result = { ok: false, mode };
  let session = null;
  try {
    session = await openComfy(url, mode);
    Object.assign(result, await session.page.evaluate(() => {
      const app = window.comfyAPI.app.app;
      return {
        extensions: app.extensions.map((e) => e.name).filter((n) => n.startsWith("lycoris")),
        frontend_version: window.__COMFYUI_FRONTEND_VERSION__ ?? null,
        vue_nodes_setting: app.extensionManager.setting.get("Comfy.VueNodes.Enabled"),
      };
    }));
    await body(session.page, result);
    await session.page.mouse.move(2, 855);  // no hover tooltip in the screenshot
    await session.page.waitForTimeout(300);
    fs.mkdirSync(path.dirname(shot), { recursive: true });
    await session.page.screenshot({ path: shot });
    result.screenshot = shot;
    result.ok = true;
  } catch (e) {
    result.error = String(e?.stack ?? e);
    try {
      await session?.page.screenshot({ path: shot.replace(/\.png$/, ".failed.png") });
    } catch { /* the failure itself is reported */ }
  } finally {
    result.log = session?.log.slice(0, 50) ?? [];
    await session?.close();
  }
  console.log(JSON.stringify(result));
  process.exit(result.ok ? 0 : 1);
}

/** Add a node by type at `pos` (graph coordinates) with widget values; returns its id. */
export async function addNode(page, type, pos, widgets = {}, size = null) {
  return page.evaluate(({ type, pos, widgets, size }) => {
    const app = window.comfyAPI.app.app;
    const node = window.LiteGraph.createNode(type);
    node.pos = pos;
    app.graph.add(node);
    for (const [name, value] of Object.entries(widgets)) {
      const w = node.widgets.find((x) => x.name === name);
      w.value = value;
      w.callback?.(value);
    }
    if (size) node.size = size;
    return node.id;
  }, { type, pos, widgets, size });
}

/** Connect output `slot` of node `from` to input `input` (by name) of node `to`. */
export async function connect(page, from, slot, to, input) {
  await page.evaluate(({ from, slot, to, input }) => {
    const g = window.comfyAPI.app.app.graph;
    const target = g.getNodeById(to);
    g.getNodeById(from).connect(slot, target, target.findInputSlot(input));
  }, { from, slot, to, input });
}

/** Show graph coordinates (0,0) at the canvas' top left, scale 1. */
export async function resetView(page, offset = [0, 40]) {
  await page.evaluate((offset) => {
    const c = window.comfyAPI.app.app.canvas;
    c.ds.offset = offset;
    c.ds.scale = 1;
    c.setDirty(true, true);
    c.draw(true, true);
  }, offset);
}

/** Text of a DOM widget's element (whether or not the frontend has it on screen right now). */
export async function widgetText(page, nodeId, widget, selector = null) {
  return page.evaluate(({ nodeId, widget, selector }) => {
    const w = window.comfyAPI.app.app.graph.getNodeById(nodeId)?.widgets?.find((x) => x.name === widget);
    const el = selector ? w?.element?.querySelector(selector) : w?.element;
    return el ? el.textContent : null;
  }, { nodeId, widget, selector });
}

/** Wait until widgetText(...) contains `text` (polling; `timeout` ms). */
export async function waitWidgetText(page, nodeId, widget, text, timeout, selector = null) {
  const end = Date.now() + timeout;
  for (;;) {
    const got = await widgetText(page, nodeId, widget, selector);
    if (got !== null && got.includes(text)) return got;
    if (Date.now() > end) throw new Error(`timeout waiting for ${JSON.stringify(text)} in ${widget}: ${got}`);
    await page.waitForTimeout(250);
  }
}

/** Whether node `nodeId` is drawn as a Vue component (Nodes 2.0) rather than on the canvas. */
export async function isVueNode(page, nodeId) {
  return page.evaluate((id) => document.querySelector(`[data-node-id="${id}"]`) !== null, nodeId);
}

/**
 * Where widget `widget` of node `nodeId` starts, in graph units below the node's top (its title
 * not counted): the canvas layout's `y` in classic mode; in Vue mode (where that layout is not
 * used) measured in the DOM from the node's element, whose top is its title's.
 */
export async function widgetTop(page, nodeId, widget) {
  return page.evaluate(({ nodeId, widget }) => {
    const app = window.comfyAPI.app.app;
    const w = app.graph.getNodeById(nodeId).widgets.find((x) => x.name === widget);
    const el = document.querySelector(`[data-node-id="${nodeId}"]`);
    if (!el) return w.y ?? w.last_y;
    const top = (w.element.getBoundingClientRect().top - el.getBoundingClientRect().top) / app.canvas.ds.scale;
    return top - window.LiteGraph.NODE_TITLE_HEIGHT;
  }, { nodeId, widget });
}

/** Wait until the server's queue has nothing running or pending (polling; `timeout` ms). */
export async function waitQueueEmpty(page, timeout) {
  await page.waitForFunction(async () => {
    const q = await (await fetch("/api/queue")).json();
    // the server's queue, and the frontend's view of it (from the server's status messages)
    return !q.queue_running.length && !q.queue_pending.length && window.comfyAPI.app.app.ui.lastQueueSize === 0;
  }, null, { timeout, polling: 250 });
}

/** Whether the panel of DOM widget `widget` shows all its content (nothing scrolled or cut off). */
export async function panelFits(page, nodeId, widget) {
  return page.evaluate(({ nodeId, widget }) => {
    const el = window.comfyAPI.app.app.graph.getNodeById(nodeId).widgets.find((x) => x.name === widget).element;
    return { fits: el.scrollHeight <= el.clientHeight + 1, scrollHeight: el.scrollHeight, clientHeight: el.clientHeight };
  }, { nodeId, widget });
}

/**
 * Type `text` into the text widget `widget` of node `nodeId` as a user does: in Vue mode into the
 * node's own text field; in classic mode by clicking the widget on the canvas, which opens the
 * canvas' value dialog (the node must be on screen). Enter commits.
 */
export async function typeInWidget(page, nodeId, widget, text) {
  const field = page.locator(`[data-node-id="${nodeId}"] :is(input, textarea)[aria-label="${widget}"]`);
  if (await isVueNode(page, nodeId)) {
    await field.fill(text);
    await field.press("Enter");
    return;
  }
  const at = await page.evaluate(({ nodeId, widget }) => {
    const app = window.comfyAPI.app.app;
    const node = app.graph.getNodeById(nodeId);
    const w = node.widgets.find((x) => x.name === widget);
    const { scale, offset } = app.canvas.ds;
    const rect = app.canvas.canvas.getBoundingClientRect();
    return { x: rect.left + (offset[0] + node.pos[0] + node.size[0] / 2) * scale,
      y: rect.top + (offset[1] + node.pos[1] + (w.y ?? w.last_y) + 10) * scale };
  }, { nodeId, widget });
  await page.mouse.move(at.x, at.y);
  await page.mouse.click(at.x, at.y, { delay: 100 });
  const dialog = page.locator(".graphdialog input.value").last();
  await dialog.waitFor({ state: "visible", timeout: 15_000 });
  await dialog.fill(text);
  await dialog.press("Enter");
}
