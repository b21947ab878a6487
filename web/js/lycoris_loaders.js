// Loader nodes (LoadLoHa / LoadLoKr / LoadLyCORIS): a panel with the selected file's metadata
// (from GET /lycoris/metadata, before anything runs) and, after a run, the node's load report
// (the `text` of its UI output, the same text as its `report` output).
import { addPanel, chain, counts, fetchJson, onWidgetChange, registerNodeExtension, readersSection,
  renderSections }
  from "./lycoris_panel.js";
import { appendEffectMap } from "./lycoris_effectmap.js";

const LOADERS = { LoadLoHa: "loha", LoadLoKr: "lokr", LoadLyCORIS: null };
const ALGO_LABEL = { loha: "LoHa", lokr: "LoKr", lora: "LoRA" };
const META_KEYS = [
  "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
  "ss_base_model_version", "ss_output_name", "modelspec.title", "modelspec.architecture",
  "ss_steps", "ss_epoch", "ss_learning_rate", "ss_training_comment",
];
const MAX_LISTED = 8;

export const fetchMetadata = (loraName) =>
  fetchJson(`/lycoris/metadata?lora_name=${encodeURIComponent(loraName)}`);
export const fetchEffectMap = (loraName) =>
  fetchJson(`/lycoris/effectmap?lora_name=${encodeURIComponent(loraName)}`);

// `total`: the full count when the route sent only the first names (`<list>_total`)
function listed(names, total = names.length) {
  const more = total > MAX_LISTED ? ` … (+${total - MAX_LISTED} more)` : "";
  return names.slice(0, MAX_LISTED).join(", ") + more;
}

/** Panel sections for an `Adapter.summary()` answer; `expect` is the node's algorithm or null. */
export function metadataSections(s, expect) {
  const algos = Object.keys(s.algorithms ?? {});
  const rows = [
    ["architecture", s.architecture ?? "unknown"],
    ["modules", s.modules],
    ["algorithms", counts(Object.fromEntries(Object.entries(s.algorithms ?? {}).map(
      ([a, n]) => [ALGO_LABEL[a] ?? a, n])))],
    ["rank", counts(s.ranks)],
    ["alpha", counts(s.alphas)],
  ];
  if (Object.keys(s.lokr_factor ?? {}).length) rows.push(["LoKr factor", counts(s.lokr_factor)]);
  rows.push(["modes", counts(s.modes)]);
  rows.push(["matched", `${s.matched} of ${s.modules} (${s.architecture}) — ${counts(s.matched_by_component)}`]);
  if (expect && !algos.includes(expect)) {
    rows.unshift(["", `WARNING: this node loads ${ALGO_LABEL[expect]} files; this one holds ` +
      `${algos.map((a) => ALGO_LABEL[a] ?? a).join(", ") || "nothing"}`, "lyc-warn"]);
  }
  if (s.unmatched?.length) {
    const n = s.unmatched_total ?? s.unmatched.length;
    rows.unshift(["", `WARNING: ${n} modules match no ${s.architecture} layer: ` +
      listed(s.unmatched, n), "lyc-warn"]);
  }
  if (s.unknown_keys?.length) {
    rows.push(["ignored keys", listed(s.unknown_keys, s.unknown_keys_total), "lyc-warn"]);
  }
  const meta = s.metadata ?? {};
  const metaRows = META_KEYS.filter((k) => k in meta).map((k) => [k, meta[k]]);
  const rest = Object.keys(meta).length - metaRows.length;
  if (rest > 0) metaRows.push(["", `(+${rest} more metadata keys)`]);
  return [
    { title: `file: ${s.file}`, rows },
    readersSection(s.readers),
    { title: metaRows.length ? "metadata" : "metadata: none", rows: metaRows },
  ].filter(Boolean);
}

/** Panel section for the load report text of a run (warning lines highlighted). */
export function reportSection(text) {
  const rows = String(text).split("\n").map((line) => ["", line,
    line.startsWith("WARNING") ? "lyc-warn" : ""]);
  return { title: "load report (last run)", rows };
}

function setupLoader(node, expect) {
  const panel = addPanel(node, "lycoris_info", "lycoris-loader-info", 160);
  const state = { sections: [], report: null, requested: null, summary: null };
  const show = () => {
    renderSections(panel, state.report ? [...state.sections, state.report] : state.sections);
    // the map right after the file's metadata, before the load report of a run
    const reportTitle = state.report ? [...panel.querySelectorAll(".lyc-title")].at(-1) : null;
    appendEffectMap(panel, state.summary, reportTitle);
  };

  const refresh = async (loraName) => {
    if (!loraName || loraName === state.requested) return;
    state.requested = loraName;
    state.report = null;
    state.summary = null;
    state.sections = [{ title: `file: ${loraName}`, rows: [["", "reading…"]] }];
    show();
    try {
      const summary = await fetchMetadata(loraName);
      if (state.requested !== loraName) return;  // a newer selection won
      state.sections = metadataSections(summary, expect);
    } catch (e) {
      if (state.requested !== loraName) return;
      state.sections = [{ title: `file: ${loraName}`, rows: [["", String(e.message ?? e), "lyc-error"]] }];
    }
    panel.dataset.loraName = loraName;
    show();
    try {  // the effect map reads the factors: its own route, drawn when it comes
      const map = await fetchEffectMap(loraName);
      if (state.requested !== loraName) return;
      state.summary = map;
    } catch (e) {
      if (state.requested !== loraName) return;
      state.summary = { blocks: {}, blocks_png: "", blocks_message: String(e.message ?? e) };
    }
    show();
  };

  const widget = onWidgetChange(node, "lora_name", refresh);
  // Also after a workflow is loaded (configure sets the widget value after creation).
  chain(node, "onConfigure", () => refresh(widget?.value));
  setTimeout(() => refresh(widget?.value), 0);
  chain(node, "onExecuted", (message) => {
    const text = message?.text;
    if (text?.length) {
      state.report = reportSection(Array.isArray(text) ? text.join("\n") : text);
      show();
    }
  });
}

registerNodeExtension("lycoris_nodes.loaders", Object.keys(LOADERS),
  (node, type) => setupLoader(node, LOADERS[type]));
