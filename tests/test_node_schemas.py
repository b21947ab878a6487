"""Every node of the pack, as ComfyUI's frontend receives it (the V1 node info of the loaded pack):
a description, a LyCORIS category, a tooltip on every input and output, and a help page
`web/docs/<NodeId>.md` that names each of its inputs and outputs."""

from __future__ import annotations

import copy
import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "web" / "docs"


def _node_infos(host) -> dict[str, dict]:
    classes = host.nodes.NODE_CLASS_MAPPINGS
    ids = [cls.define_schema().node_id for cls in host.pack.nodes.NODES]
    return {nid: classes[nid].GET_NODE_INFO_V1() for nid in ids}


def _inputs(info: dict) -> dict[str, dict]:
    return {name: (spec[1] if len(spec) > 1 else {})
            for section in ("required", "optional")
            for name, spec in (info["input"].get(section) or {}).items()}


def schema_problems(infos: dict[str, dict]) -> list[str]:
    problems = []
    for nid, info in infos.items():
        if len((info.get("description") or "").strip()) < 20:
            problems.append(f"{nid}: no description")
        if not str(info.get("category", "")).startswith("LyCORIS/"):
            problems.append(f"{nid}: category {info.get('category')!r} is not under LyCORIS/")
        if not (info.get("display_name") or "").strip():
            problems.append(f"{nid}: no display name")
        for name, opts in _inputs(info).items():
            if not (opts.get("tooltip") or "").strip():
                problems.append(f"{nid}: input {name!r} has no tooltip")
        tips = info.get("output_tooltips") or []
        for i, out in enumerate(info["output"]):
            if i >= len(tips) or not (tips[i] or "").strip():
                problems.append(f"{nid}: output {i} ({out}) has no tooltip")
    return problems


def doc_problems(infos: dict[str, dict], docs: Path = DOCS) -> list[str]:
    problems = []
    for nid, info in infos.items():
        page = docs / f"{nid}.md"
        if not page.is_file():
            problems.append(f"{nid}: no help page web/docs/{nid}.md")
            continue
        text = page.read_text(encoding="utf-8")
        if not text.lstrip().startswith("#"):
            problems.append(f"{nid}: the help page does not start with a title")
        # numbered inputs (lora_1 … lora_4) may be documented together; unnamed outputs show as
        # their type and are not looked for
        outputs = zip(info.get("output_name") or [], info["output"], strict=True)
        names = [*_inputs(info), *(n for n, t in outputs if n != t)]
        missing = [n for n in names if n not in text and not (
            re.search(r"_\d+$", n) and re.sub(r"_\d+$", "_", n) in text)]
        if missing:
            problems.append(f"{nid}: the help page does not mention {missing}")
    return problems


def test_pack_registers_its_nodes(host):
    infos = _node_infos(host)
    assert {"LoadLoHa", "LoadLoKr", "LoadLyCORIS"} <= set(infos)
    assert len(infos) == len(host.pack.nodes.NODES), "a node id is registered twice"


def test_description_category_tooltips(host):
    problems = schema_problems(_node_infos(host))
    assert not problems, "\n".join(problems)


def test_help_page_per_node(host):
    """web/docs/<NodeId>.md (what the frontend's node help shows) covers every input and output."""
    problems = doc_problems(_node_infos(host))
    assert not problems, "\n".join(problems)


def test_the_checks_find_what_is_missing(host, tmp_path):
    infos = _node_infos(host)
    nid = "LoadLoKr"
    broken = copy.deepcopy(infos[nid])
    broken["description"] = " "
    broken["input"]["required"]["strength_model"][1]["tooltip"] = ""
    broken["output_tooltips"] = broken["output_tooltips"][:1]
    found = schema_problems({nid: broken})
    assert f"{nid}: no description" in found
    assert f"{nid}: input 'strength_model' has no tooltip" in found
    assert f"{nid}: output 1 (CLIP) has no tooltip" in found
    (tmp_path / f"{nid}.md").write_text("# Load LoKr\n`model`, `lora_name`\n")
    assert "does not mention" in doc_problems({nid: infos[nid]}, tmp_path)[0]
    assert doc_problems({"LoadLoHa": infos["LoadLoHa"]}, tmp_path) == [
        "LoadLoHa: no help page web/docs/LoadLoHa.md"]
