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

/** Open the ComfyUI page at `url`; resolves when the graph and the pack's node types exist. */
export async function openComfy(url) {
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
    await page.waitForFunction(() => {
      const app = window.comfyAPI?.app?.app;
      return app?.graph && app?.canvas && window.LiteGraph?.registered_node_types?.LoadLoKr;
    }, null, { timeout: 120_000 });
    await page.evaluate(() => { window.comfyAPI.app.app.graph.clear(); });
  } catch (e) {
    await close();
    throw e;
  }
  return { page, log, close };
}

/** Run `body(page, result)` on a fresh ComfyUI page; print the JSON result; exit 0 only if ok. */
export async function runScenario(url, shot, body) {
  const result = { ok: false };
  let session = null;
  try {
    session = await openComfy(url);
    result.extensions = await session.page.evaluate(() =>
      window.comfyAPI.app.app.extensions.map((e) => e.name).filter((n) => n.startsWith("lycoris")));
    await body(session.page, result);
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
