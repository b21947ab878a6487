// LyCORISStrengthSchedule: a live chart of the strength curve while the schedule text is edited
// (parsed on the server by the node's own parser: GET /lycoris/schedule), with the steps the
// sampler will take (preview_steps) marked. After a run the node also shows its curve image.
import { addChartPanel, chain, fetchJson, onWidgetChange, registerNodeExtension } from "./lycoris_panel.js";

const NODE = "LyCORISStrengthSchedule";

export const fetchCurve = (schedule, interpolation) =>
  fetchJson(`/lycoris/schedule?${new URLSearchParams({ schedule, interpolation })}`);

function setupSchedule(node) {
  const { caption, draw } = addChartPanel(node, "lycoris_curve", "lycoris-schedule-curve", 100);
  const value = (name) => node.widgets?.find((w) => w.name === name)?.value;
  let pending = 0;
  let report = "";  // the last run's report (weights scheduled, extra memory while sampling)
  caption.style.whiteSpace = "pre-line";

  const refresh = async () => {
    const ticket = ++pending;
    try {
      const c = await fetchCurve(String(value("schedule") ?? ""), String(value("interpolation") ?? "linear"));
      if (ticket !== pending) return;
      const n = Number(value("preview_steps") ?? 0);
      const steps = n > 0 ? [...Array(n).keys()].map((i) => i / n) : [];
      const stepStrength = steps.map((p) => c.strength[Math.round(p * (c.percent.length - 1))]);
      draw([
        { xs: c.percent.map((p) => p * 100), ys: c.strength, color: "#4fd1c5" },
        ...(steps.length ? [{ xs: steps.map((p) => p * 100), ys: stepStrength, color: "#f6ad55", dots: true }] : []),
      ], { title: "strength", xLabel: "%" });
      caption.className = "";
      caption.textContent = c.describe + (steps.length ? `  (orange: ${n} steps)` : "")
        + (report ? `\n${report}` : "");
    } catch (e) {
      if (ticket !== pending) return;
      draw([], { title: "strength" });
      caption.className = "lyc-error";
      caption.textContent = String(e.message ?? e);
    }
  };
  for (const name of ["schedule", "interpolation", "preview_steps"]) onWidgetChange(node, name, refresh);
  chain(node, "onConfigure", refresh);
  chain(node, "onExecuted", (message) => {
    const text = message?.text;
    if (text?.length) {
      report = Array.isArray(text) ? text.join("\n") : String(text);
      refresh();
    }
  });
  setTimeout(refresh, 0);
}

registerNodeExtension("lycoris_nodes.schedule", [NODE], setupSchedule);
