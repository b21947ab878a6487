// Load LoKr in the real ComfyUI frontend: add the node through the node search box, pick a file
// in its lora_name combo by clicking it, wait for the LyCORIS metadata panel; with "run", queue
// tiny model -> Load LoKr -> sink and wait for the load report in the same panel. Screenshot.
// usage: node loader_panel.mjs <url> <lora_name> <screenshot.png> [run]
import { addNode, connect, resetView, runScenario } from "./common.mjs";

const [url, loraName, shot, mode] = process.argv.slice(2);
if (!url || !loraName || !shot) {
  console.error("usage: node loader_panel.mjs <url> <lora_name> <screenshot.png> [run]");
  process.exit(2);
}
const PANEL = ".lycoris-loader-info";

await runScenario(url, shot, async (page, result) => {
  // Add the node the way a user does: double-click the empty canvas, search, click the result.
  // (The search box is re-opened once if the first attempt did not add the node: under load the
  // result list is sometimes still being replaced when it is clicked.)
  const added = () => page.evaluate(() => window.comfyAPI.app.app.graph._nodes.some((n) => n.type === "LoadLoKr"));
  for (let attempt = 1; attempt <= 2 && !(await added()); attempt++) {
    await page.keyboard.press("Escape");
    await page.locator("#graph-canvas").dblclick({ position: { x: 500, y: 300 } });
    const search = page.locator(".comfy-vue-node-search-box input, input[id^='comfy-vue-node-search-box-input']").first();
    await search.waitFor({ state: "visible", timeout: 30_000 });
    await search.fill("Load LoKr");
    const option = page.locator(".p-autocomplete-option, li[role='option']").filter({ hasText: /^\s*Load LoKr/ }).first();
    await option.waitFor({ state: "visible", timeout: 30_000 });
    await page.waitForTimeout(500);
    await option.click();
    await page.waitForFunction(() => window.comfyAPI.app.app.graph._nodes.some((n) => n.type === "LoadLoKr"),
      null, { timeout: 15_000 }).catch(() => {});
    result.search_attempts = attempt;
  }
  if (!(await added())) throw new Error("the node search did not add a Load LoKr node");

  // Place it at a known spot and click its lora_name combo (a LiteGraph context menu opens).
  const offset = [0, 130];  // below the top bar
  await resetView(page, offset);
  const combo = await page.evaluate((offset) => {
    const app = window.comfyAPI.app.app;
    const node = app.graph._nodes.find((n) => n.type === "LoadLoKr");
    node.pos = [360, 40];
    node.size = [Math.max(node.size[0], 560), Math.max(node.size[1], 640)];
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
    const w = node.widgets.find((x) => x.name === "lora_name");
    const rect = app.canvas.canvas.getBoundingClientRect();
    return { id: node.id, x: rect.left + offset[0] + node.pos[0] + node.size[0] / 2,
      y: rect.top + offset[1] + node.pos[1] + (w.y ?? w.last_y) + 10, options: w.options.values };
  }, offset);
  result.combo_options = combo.options;
  await page.waitForTimeout(300);
  await page.mouse.click(combo.x, combo.y);
  const entry = page.locator(".litecontextmenu .litemenu-entry", { hasText: loraName }).first();
  await entry.waitFor({ state: "visible", timeout: 15_000 });
  await entry.click();
  result.selected = await page.evaluate((id) => window.comfyAPI.app.app.graph.getNodeById(id)
    .widgets.find((x) => x.name === "lora_name").value, combo.id);

  await page.waitForFunction(([sel, name]) => {
    const el = document.querySelector(sel);
    return el && el.dataset.loraName === name && el.textContent.includes("architecture");
  }, [PANEL, loraName], { timeout: 30_000 });
  result.panel_text = await page.locator(PANEL).innerText();
  result.panel_visible = await page.locator(PANEL).isVisible();

  if (mode === "run") {
    const model = await addNode(page, "LycorisTestModel", [20, 40], { kind: "tiny_sdxl" });
    const sink = await addNode(page, "LycorisTestSink", [950, 40]);
    await connect(page, model, 0, combo.id, "model");
    await connect(page, model, 1, combo.id, "clip");
    await connect(page, combo.id, 0, sink, "model");
    await connect(page, combo.id, 2, sink, "text");
    await page.evaluate(() => window.comfyAPI.app.app.queuePrompt(0, 1));
    await page.waitForFunction((sel) => document.querySelector(sel)?.textContent.includes("load report"),
      PANEL, { timeout: 180_000 });
    result.panel_text = await page.locator(PANEL).innerText();
  }
});
