// The example workflows in the real ComfyUI frontend: each one is fetched from the server the way
// the template browser does (/api/workflow_templates/<pack>/<name>.json), loaded into the graph
// with app.loadGraphData, and turned into an API prompt by the frontend itself
// (app.graphToPrompt). Prints {name: {nodes, prompt}} for tests/test_browser.py to compare with
// the test suite's own UI -> API conversion. Screenshot of the last one.
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
      const missing = app.graph._nodes.filter((n) => n.has_errors || n.type === undefined).map((n) => n.type);
      const p = await app.graphToPrompt();
      return { nodes: app.graph._nodes.length, missing, prompt: p.output };
    }, [pack, name]);
  }
});
