// The example workflows in the real ComfyUI frontend: each one is fetched from the server the way
// the template browser does (/api/workflow_templates/<pack>/<name>.json), loaded into the graph
// with app.loadGraphData, and turned into an API prompt by the frontend itself
// (app.graphToPrompt). Prints {name: {nodes, missing, errors, prompt}} for tests/test_browser.py
// to compare with the test suite's own UI -> API conversion: `missing` = node types the frontend
// does not know, `errors` = nodes it marks as in error (frontend 1.45 also marks a node whose
// model file is not on the server, a moment after loading), `layout` = each node's box and the
// least size its content needs. Screenshots: each workflow zoomed to fit (<screenshot>.<name>.png).
// usage: node workflows.mjs <url> <pack folder name> <screenshot.png> <name>...
import { runScenario } from "./common.mjs";

const [url, pack, shot, ...names] = process.argv.slice(2);
if (!url || !pack || !shot || !names.length) {
  console.error("usage: node workflows.mjs <url> <pack> <screenshot.png> <name>...");
  process.exit(2);
}

await runScenario(url, shot, async (page, result) => {
  result.workflows = {};
  for (const name of names) {
    result.workflows[name] = await page.evaluate(async ([pack, name]) => {
      const app = window.comfyAPI.app.app;
      const res = await fetch(`/api/workflow_templates/${pack}/${name}.json`);
      if (!res.ok) throw new Error(`${name}: HTTP ${res.status}`);
      const wf = await res.json();
      await app.loadGraphData(wf, true, true, name);
      await new Promise((resolve) => setTimeout(resolve, 1000));  // the file checks have answered
      const nodes = app.graph._nodes;
      const missing = nodes.filter((n) => !window.LiteGraph.registered_node_types[n.type]).map((n) => n.type);
      const errors = nodes.filter((n) => n.has_errors).map((n) => n.type);
      const p = await app.graphToPrompt();
      // each node's box as loaded and the least size its content needs (the canvas layout)
      const layout = nodes.map((n) => ({ id: n.id, type: n.type, pos: Array.from(n.pos),
        size: Array.from(n.size), min: Array.from(n.computeSize()) }));
      return { nodes: nodes.length, missing, errors, prompt: p.output, layout,
        title_height: window.LiteGraph.NODE_TITLE_HEIGHT };
    }, [pack, name]);
    // the whole graph in view (the frontend's "zoom to fit"), one screenshot per workflow
    await page.evaluate(() => window.comfyAPI.app.app.extensionManager.command.execute("Comfy.Canvas.FitView"));
    await page.waitForTimeout(500);
    await page.screenshot({ path: shot.replace(/\.png$/, `.${name}.png`) });
  }
});
