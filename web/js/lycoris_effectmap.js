// The effect map in the loaders' metadata panel: ‖ΔW‖ per block and layer kind, drawn by the
// server (GET /lycoris/metadata's `blocks_png`, the same picture as the LyCORISEffectMap node and
// `inspect --map`), with its note (`blocks_message`). Text is set with textContent only.

const STYLE = `
.lycoris-panel .lyc-effect-map { display: block; width: auto; max-width: 100%; height: auto;
  image-rendering: pixelated; margin: 4px 0; }
`;
let styleAdded = false;

/**
 * Add the effect map of a metadata answer `s` to `panel`, before the element `before` (or at the
 * end); nothing when `s` has none.
 */
export function appendEffectMap(panel, s, before = null) {
  if (!s || !("blocks" in s)) return null;
  if (!styleAdded) {
    const style = document.createElement("style");
    style.textContent = STYLE;
    document.head.appendChild(style);
    styleAdded = true;
  }
  const title = document.createElement("div");
  title.className = "lyc-title";
  const n = Object.keys(s.blocks ?? {}).length;
  title.textContent = `effect map: ‖ΔW‖ per block (${n} blocks)`;
  panel.insertBefore(title, before);
  if (s.blocks_message) {
    const note = document.createElement("div");
    note.className = "lyc-row lyc-warn";
    note.textContent = s.blocks_message;
    panel.insertBefore(note, before);
  }
  if (!s.blocks_png) return title;
  const img = document.createElement("img");
  img.className = "lyc-effect-map";
  img.alt = "effect map";
  img.dataset.lycorisEffectMap = String(n);
  img.src = `data:image/png;base64,${s.blocks_png}`;
  panel.insertBefore(img, before);
  return img;
}
