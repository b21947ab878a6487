// The schedule curve and the live loss chart in the real ComfyUI frontend: a Strength Schedule
// node draws its curve while its schedule text changes; a tiny TrainLyCORIS run fills the loss
// chart from the trainer's progress text. Screenshot of both.
// usage: node schedule_train.mjs <url> <lora_name> <screenshot.png> <train steps>
import { addNode, connect, resetView, runScenario, waitWidgetText, widgetText } from "./common.mjs";

const [url, loraName, shot, steps] = process.argv.slice(2);
if (!url || !loraName || !shot || !steps) {
  console.error("usage: node schedule_train.mjs <url> <lora_name> <screenshot.png> <train steps>");
  process.exit(2);
}

await runScenario(url, shot, async (page, result) => {
  await resetView(page, [0, 40]);
  const sched = await addNode(page, "LyCORISStrengthSchedule", [20, 20],
    { lora_name: loraName, schedule: "0:0, 30%:1, 70%:1, 100%:0", interpolation: "cosine",
      preview_steps: 12 }, [420, 620]);
  result.curve_caption = await waitWidgetText(page, sched, "lycoris_curve", "cosine", 30_000);
  // an invalid schedule shows the parser's error instead of a curve
  await page.evaluate((id) => {
    const w = window.comfyAPI.app.app.graph.getNodeById(id).widgets.find((x) => x.name === "schedule");
    w.value = "0:1, banana";
    w.callback?.(w.value);
  }, sched);
  result.curve_error = await waitWidgetText(page, sched, "lycoris_curve", "banana", 30_000, ".lyc-error");
  await page.evaluate((id) => {
    const w = window.comfyAPI.app.app.graph.getNodeById(id).widgets.find((x) => x.name === "schedule");
    w.value = "fade_out";
    w.callback?.(w.value);
  }, sched);
  result.curve_preset_caption = await waitWidgetText(page, sched, "lycoris_curve", "100%:0", 30_000);
  result.curve_preset_error = await widgetText(page, sched, "lycoris_curve", ".lyc-error");

  // tiny model + empty latents + a prompt -> TrainLyCORIS -> sink; the chart follows the steps.
  const model = await addNode(page, "LycorisTestModel", [470, 20], { kind: "tiny_sdxl" });
  const latent = await addNode(page, "EmptyLatentImage", [470, 200], { width: 64, height: 64, batch_size: 2 });
  const text = await addNode(page, "CLIPTextEncode", [470, 360], { text: "a tiny cat" }, [300, 120]);
  const train = await addNode(page, "TrainLyCORIS", [800, 20],
    { algorithm: "lokr", steps: Number(steps), training_dtype: "fp32", learning_rate: 0.001 }, [440, 1200]);
  const sink = await addNode(page, "LycorisTestSink", [470, 520]);
  await connect(page, model, 0, train, "model");
  await connect(page, model, 1, text, "clip");
  await connect(page, latent, 0, train, "latents");
  await connect(page, text, 0, train, "positive");
  await connect(page, train, 0, sink, "model");
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
  // both panels side by side: the trainer moved up so its chart is level with the curve
  await page.evaluate(([a, b, c]) => {
    const app = window.comfyAPI.app.app;
    const g = app.graph;
    const y = (node, name) => { const w = node.widgets.find((x) => x.name === name); return w.y ?? w.last_y; };
    const s = g.getNodeById(a);
    const t = g.getNodeById(b);
    s.pos = [20, 20];
    t.pos = [470, s.pos[1] + y(s, "lycoris_curve") - y(t, "lycoris_loss")];
    g.getNodeById(c).pos = [960, s.pos[1] + y(s, "lycoris_curve")];
    app.canvas.ds.offset = [0, 40 - (y(s, "lycoris_curve") - 300)];
    app.canvas.setDirty(true, true);
  }, [sched, train, sink]);
});
