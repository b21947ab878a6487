// TrainLyCORIS: a live loss chart on the node. The trainer reports each step as ComfyUI progress
// text ("step N/T  loss X", PromptServer.send_progress_text); this draws the raw loss and its
// running mean while training runs.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { addChartPanel, registerNodeExtension } from "./lycoris_panel.js";

const NODE = "TrainLyCORIS";
const STEP_RE = /step\s+(\d+)\s*\/\s*(\d+)\s+loss\s+([-+0-9.eE]+|nan|inf)/i;

const VAL_RE = /\sval_loss\s+([-+0-9.eE]+|nan|inf)/i;

/** {step, total, loss, val?} from a progress text of the trainer, or null; `val` is the
 * validation loss when the text reports one (validate_every_n_steps). */
export function parseProgress(text) {
  const m = STEP_RE.exec(String(text ?? ""));
  if (!m) return null;
  const v = VAL_RE.exec(String(text));
  const out = { step: Number(m[1]), total: Number(m[2]), loss: Number(m[3]) };
  if (v) out.val = Number(v[1]);
  return out;
}

/** Exponential running mean (sd-scripts' "avr_loss" idea) of `ys`. */
function runningMean(ys, beta = 0.9) {
  let m = null;
  return ys.map((y) => (m = m === null ? y : beta * m + (1 - beta) * y));
}

function setupTrainer(node) {
  const { caption, draw } = addChartPanel(node, "lycoris_loss", "lycoris-loss-chart", 110);
  // kept on the node: its id is only known once it is in the graph
  node.lycorisLossChart = { caption, draw, steps: [], losses: [], valSteps: [], vals: [] };
  caption.textContent = "loss: not trained yet";
  setTimeout(() => draw([], { title: "loss" }), 0);
}

/**
 * Grow `node` to the height its widgets need. The frontend shows progress text in a widget of its
 * own that it adds under the chart on the first message, without growing the node (1.32 and 1.45
 * alike): the node was then 20 px shorter than its widgets need, and that widget got less room.
 */
function fitHeight(node) {
  const need = node.computeSize?.()?.[1];
  if (need > node.size[1]) {
    node.setSize([node.size[0], need]);
    node.setDirtyCanvas?.(true, true);
  }
}

function onProgressText(event) {
  const { nodeId, text } = event.detail ?? {};
  const node = app.graph?.getNodeById(nodeId);
  const chart = node?.lycorisLossChart;
  const p = parseProgress(text);
  if (!chart || !p) return;
  setTimeout(() => fitHeight(node), 0);  // after the frontend's own listener has added its widget
  if (p.val !== undefined) {  // the validation loss of a step already drawn
    chart.valSteps.push(p.step);
    chart.vals.push(p.val);
  } else {
    if (chart.steps.length && p.step <= chart.steps[chart.steps.length - 1]) {
      chart.steps = [];  // a new run
      chart.losses = [];
      chart.valSteps = [];
      chart.vals = [];
    }
    chart.steps.push(p.step);
    chart.losses.push(p.loss);
  }
  const series = [
    { xs: chart.steps, ys: chart.losses, color: "#718096" },
    { xs: chart.steps, ys: runningMean(chart.losses), color: "#4fd1c5" },
  ];
  if (chart.vals.length) series.push({ xs: chart.valSteps, ys: chart.vals, color: "#e53e3e" });
  chart.draw(series, { title: "loss", xLabel: "step" });
  const last = chart.vals.length ? `  val ${chart.vals[chart.vals.length - 1].toPrecision(4)}` : "";
  chart.caption.textContent = `step ${p.step}/${p.total}  loss ${p.loss.toPrecision(4)}${last}`;
}

registerNodeExtension("lycoris_nodes.train", [NODE], setupTrainer, {
  setup() {
    api.addEventListener("progress_text", onProgressText);
  },
});
