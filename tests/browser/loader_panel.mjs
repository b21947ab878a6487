// Load LoKr in the real ComfyUI frontend: add the node through the node search box (placing it with
// a click where the frontend lets it follow the cursor), read the panel of the file its lora_name
// combo starts on, pick `lora_name` in that combo by clicking (the canvas' context menu in classic
// mode, the node's own dropdown in Vue mode), wait for the LyCORIS metadata panel; with "run",
// queue tiny model -> Load LoKr -> sink and wait for the load report in the same panel. Screenshot.
// usage: node loader_panel.mjs <url> <lora_name> <screenshot.png> <classic|vue> [run]
import { addNode, connect, isVueNode, resetView, runScenario, waitQueueEmpty } from "./common.mjs";

const [url, loraName, shot, mode, run] = process.argv.slice(2);
if (!url || !loraName || !shot || !mode) {
  console.error("usage: node loader_panel.mjs <url> <lora_name> <screenshot.png> <classic|vue> [run]");
  process.exit(2);
}
const PANEL = ".lycoris-loader-info";
const OFFSET = [70, 130];  // graph (0, 0) right of the side bar, below the top bar
const PLACE = [290, 40];  // the node's position in the graph

/** The panel's text once it shows the metadata of `name` (waits for the server's answer). */
async function panelFor(page, name) {
  await page.waitForFunction(([sel, name]) => {
    const el = document.querySelector(sel);
    return el && el.dataset.loraName === name && el.textContent.includes("architecture");
  }, [PANEL, name], { timeout: 30_000 });
  return page.locator(PANEL).innerText();
}

await runScenario(url, shot, async (page, result) => {
  await resetView(page, OFFSET);
  // Add the node the way a user does: double-click the empty canvas, search, click the result.
  // (Where it will be placed below: the 1.32 frontend in Vue mode leaves a node where it was added.)
  // (The search box is re-opened once if the first attempt did not add the node: under load the
  // result list is sometimes still being replaced when it is clicked.)
  const added = () => page.evaluate(() => window.comfyAPI.app.app.graph._nodes.some((n) => n.type === "LoadLoKr"));
  for (let attempt = 1; attempt <= 2 && !(await added()); attempt++) {
    await page.keyboard.press("Escape");
    await page.locator("#graph-canvas").dblclick({ position: { x: OFFSET[0] + PLACE[0], y: OFFSET[1] + PLACE[1] } });
    // the search box's text field (a combobox in a dialog) and its results (options), in the
    // frontend 1.32 search box (PrimeVue autocomplete) as in the 1.45 one (its own listbox)
    const search = page.locator(".p-dialog input[role='combobox']").first();
    await search.waitFor({ state: "visible", timeout: 30_000 });
    await search.fill("Load LoKr");
    const option = page.locator("[role='option']").filter({ hasText: /^\s*Load LoKr/ }).first();
    await option.waitFor({ state: "visible", timeout: 30_000 });
    await page.waitForTimeout(500);
    await option.click();
    await page.waitForFunction(() => window.comfyAPI.app.app.graph._nodes.some((n) => n.type === "LoadLoKr"),
      null, { timeout: 15_000 }).catch(() => {});
    result.search_attempts = attempt;
  }
  if (!(await added())) throw new Error("the node search did not add a Load LoKr node");
  // frontend 1.45: the new node follows the cursor until a click on the canvas places it
  if (await page.evaluate(() => window.comfyAPI.app.app.canvas.state?.ghostNodeId != null)) {
    const [x, y] = [OFFSET[0] + PLACE[0] + 280, OFFSET[1] + PLACE[1]];
    await page.mouse.move(x, y, { steps: 4 });
    await page.mouse.click(x, y, { delay: 100 });
    result.placed_by_click = await page.evaluate(() => window.comfyAPI.app.app.canvas.state.ghostNodeId == null);
  }

  // Place it at a known spot; the panel shows the file the combo starts on.
  const node = await page.evaluate((place) => {
    const app = window.comfyAPI.app.app;
    const node = app.graph._nodes.find((n) => n.type === "LoadLoKr");
    node.pos = place;
    node.size = [Math.max(node.size[0], 560), Math.max(node.size[1], 640)];
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
    const w = node.widgets.find((x) => x.name === "lora_name");
    return { id: node.id, initial: w.value, options: w.options.values };
  }, PLACE);
  result.combo_options = node.options;
  result.initial = node.initial;
  result.vue_node = await isVueNode(page, node.id);
  result.initial_panel_text = await panelFor(page, node.initial);

  // Pick the file by clicking the combo and then the file's entry in the list that opens.
  await page.waitForTimeout(300);
  let entry;
  if (result.vue_node) {
    // as in classic mode below: a click the frontend is not ready for is made again (up to three
    // times, 10 s each), as a user would
    const combo = page.locator(`[data-node-id="${node.id}"] [role='combobox'][aria-label='lora_name']`);
    entry = page.locator("[role='option']", { hasText: loraName }).first();
    for (let click = 1; click <= 3; click++) {
      result.combo_clicks = click;
      const opened = await combo.click({ timeout: 10_000 })
        .then(() => entry.waitFor({ state: "visible", timeout: 10_000 }))
        .then(() => true, () => false);
      if (opened) break;
      await page.keyboard.press("Escape");
      await page.waitForTimeout(500);
    }
  } else {
    const at = await page.evaluate(([id, offset]) => {
      const app = window.comfyAPI.app.app;
      const node = app.graph.getNodeById(id);
      const w = node.widgets.find((x) => x.name === "lora_name");
      const rect = app.canvas.canvas.getBoundingClientRect();
      return { x: rect.left + offset[0] + node.pos[0] + node.size[0] / 2,
        y: rect.top + offset[1] + node.pos[1] + (w.y ?? w.last_y) + 10 };
    }, [node.id, OFFSET]);
    // as a hand does it: over the widget first, the button held a moment (frontend 1.45's
    // canvas opens no menu for a press and release within the same instant). A click that lands
    // while the canvas is still settling after the node was placed opens nothing, as it would for
    // a user, who clicks again: up to three clicks, each given 10 s for its menu to show.
    entry = page.locator(".litecontextmenu .litemenu-entry", { hasText: loraName }).first();
    for (let click = 1; click <= 3; click++) {
      await page.mouse.move(at.x, at.y, { steps: 2 });
      await page.mouse.click(at.x, at.y, { delay: 100 });
      result.combo_clicks = click;
      if (await entry.waitFor({ state: "visible", timeout: 10_000 }).then(() => true, () => false)) break;
      await page.keyboard.press("Escape");
      await page.waitForTimeout(500);
    }
  }
  await entry.waitFor({ state: "visible", timeout: 15_000 });
  await entry.click();
  result.selected = await page.evaluate((id) => window.comfyAPI.app.app.graph.getNodeById(id)
    .widgets.find((x) => x.name === "lora_name").value, node.id);
  result.panel_text = await panelFor(page, loraName);
  result.panel_visible = await page.locator(PANEL).isVisible();
  // the effect map picture (the server's `blocks_png`) under the metadata, decoded by the browser
  result.effect_map = await page.waitForFunction((sel) => {
    const img = document.querySelector(`${sel} img.lyc-effect-map`);
    return img && img.complete && img.naturalWidth > 0 &&
      { width: img.naturalWidth, height: img.naturalHeight, blocks: img.dataset.lycorisEffectMap };
  }, PANEL, { timeout: 15_000 }).then((h) => h.jsonValue()).catch(() => null);

  if (run === "run") {
    // a seed of its own, so that a server that ran this graph before runs it again (no cache hit)
    const model = await addNode(page, "LycorisTestModel", [0, 40],
      { kind: "tiny_sdxl", seed: Math.floor(Math.random() * 1e9) });
    const sink = await addNode(page, "LycorisTestSink", [900, 40]);
    await connect(page, model, 0, node.id, "model");
    await connect(page, model, 1, node.id, "clip");
    await connect(page, node.id, 0, sink, "model");
    await connect(page, node.id, 2, sink, "text");
    await page.evaluate(() => window.comfyAPI.app.app.queuePrompt(0, 1));
    await page.waitForFunction((sel) => document.querySelector(sel)?.textContent.includes("load report"),
      PANEL, { timeout: 180_000 });
    result.panel_text = await page.locator(PANEL).innerText();
    await waitQueueEmpty(page, 60_000);  // the run is over before the screenshot
  }
}, mode);
