// The schedule curve and the live loss chart in the real ComfyUI frontend: a Strength Schedule
// node draws its curve while its schedule text is typed; a tiny TrainLyCORIS run fills the loss
// chart from the trainer's progress text. Screenshot of both.
// usage: node schedule_train.mjs <url> <lora_name> <screenshot.png> <train steps> <classic|vue>
import { addNode, connect, isVueNode, panelFits, resetView, runScenario, typeInWidget, waitQueueEmpty, waitWidgetText,
  widgetText, widgetTop } from "./common.mjs";

const [url, loraName, shot, steps, mode] = process.argv.slice(2);
if (!url || !loraName || !shot || !steps || !mode) {
  console.error("usage: node schedule_train.mjs <url> <lora_name> <screenshot.png> <train steps> <classic|vue>");
  process.exit(2);
}
const LEFT = 70;  // graph x = 0 right of the side bar

await runScenario(url, shot, async (page, result) => {
  await resetView(page, [LEFT, 40]);
  const sched = await addNode(page, "LyCORISStrengthSchedule", [20, 20],
    { lora_name: loraName, schedule: "0:0, 30%:1, 70%:1, 100%:0", interpolation: "cosine",
      preview_steps: 12 }, [420, 620]);
  result.curve_caption = await waitWidgetText(page, sched, "lycoris_curve", "cosine", 30_000);
  // typed by hand: an invalid schedule shows the parser's error instead of a curve, a preset its curve
  await typeInWidget(page, sched, "schedule", "0:1, banana");
  result.curve_error = await waitWidgetText(page, sched, "lycoris_curve", "banana", 30_000, ".lyc-error");
  await typeInWidget(page, sched, "schedule", "fade_out");
  result.curve_preset_caption = await waitWidgetText(page, sched, "lycoris_curve", "100%:0", 30_000);
  result.curve_preset_error = await widgetText(page, sched, "lycoris_curve", ".lyc-error");

  // The trainer goes where its chart will be level with the curve (for the screenshot); where the
  // chart is on it is measured on a first trainer node, removed again. (Nodes are placed when
  // added: the 1.32 frontend in Vue mode does not follow a node's position set later.)
  const curveTop = await widgetTop(page, sched, "lycoris_curve");
  const trainSize = [440, 1200];
  const probe = await addNode(page, "TrainLyCORIS", [470, 20], {}, trainSize);
  const lossTop = await widgetTop(page, probe, "lycoris_loss");
  await page.evaluate((id) => {
    const g = window.comfyAPI.app.app.graph;
    g.remove(g.getNodeById(id));
  }, probe);
  const y = 20 + curveTop;  // graph y of both charts

  // tiny model + empty latents + a prompt -> TrainLyCORIS -> sink; the chart follows the steps.
  // (a seed of its own: a server that ran this graph before runs it again, no cache hit)
  const model = await addNode(page, "LycorisTestModel", [940, y - 400],
    { kind: "tiny_sdxl", seed: Math.floor(Math.random() * 1e9) });
  const latent = await addNode(page, "EmptyLatentImage", [940, y - 220], { width: 64, height: 64, batch_size: 2 });
  const text = await addNode(page, "CLIPTextEncode", [940, y - 60], { text: "a tiny cat" }, [300, 120]);
  const train = await addNode(page, "TrainLyCORIS", [470, y - lossTop],
    { algorithm: "lokr", steps: Number(steps), training_dtype: "fp32", learning_rate: 0.001 }, trainSize);
  const sink = await addNode(page, "LycorisTestSink", [940, y + 100]);
  await connect(page, model, 0, train, "model");
  await connect(page, model, 1, text, "clip");
  await connect(page, latent, 0, train, "latents");
  await connect(page, text, 0, train, "positive");
  await connect(page, train, 0, sink, "model");
  // the view: both charts at the same height of the screen
  await page.evaluate(([y, left]) => {
    const app = window.comfyAPI.app.app;
    app.canvas.ds.offset = [left, 340 - y];
    app.canvas.setDirty(true, true);
  }, [y, LEFT]);
  await page.evaluate(() => window.comfyAPI.app.app.queuePrompt(0, 1));
  result.loss_caption = await waitWidgetText(page, train, "lycoris_loss", `step ${steps}/${steps}`, 400_000);
  // the chart canvas has been drawn on (not blank)
  result.loss_chart_pixels = await page.evaluate((id) => {
    const c = window.comfyAPI.app.app.graph.getNodeById(id).widgets.find((x) => x.name === "lycoris_loss")
      .element.querySelector("canvas");
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
    return n;
  }, train);
  result.vue_nodes = [await isVueNode(page, sched), await isVueNode(page, train)];
  await waitQueueEmpty(page, 60_000);
  await page.waitForTimeout(500);  // the node has grown for the frontend's progress-text widget
  result.loss_panel = await panelFits(page, train, "lycoris_loss");
  result.curve_panel = await panelFits(page, sched, "lycoris_curve");
}, mode);
