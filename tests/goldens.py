"""The golden cases, self-contained in the repository (no ComfyUI and no lycoris_core imports).

`tests/fixtures/` holds each case's adapter file exactly as sd-scripts or lycoris-lora wrote it,
the DoRA case's base weight, the references' case index and the manifests the suite reads (see
the README there). The expected ΔW of a case is not stored: `expected(case)` computes it from the
adapter file with the independent oracle, lycoris-lora 4.1.3's functional formulas, in float64,
rounded once to float32 (the way the reference files were made). lycoris_core is never used here,
so a golden test compares two independent implementations.

Generated ΔW are cached in `.cache/golden-expected/`, keyed by the hash of the adapter (and base)
file, the lycoris-lora and torch versions and this file's own text, so a run (and the next host)
pays once; a hit does not even import lycoris.

When the references' own folder is beside the checkout (`../shared/fixtures`, or
`LYCORIS_FIXTURES`), `test_goldens.py` checks the generated ΔW against the stored reference files.
Without it, the fingerprints in `fixtures/expected_fingerprints.json` (taken from those files)
stand in for them.

    python tests/goldens.py fingerprints   # rewrite expected_fingerprints.json from the references
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().with_name("fixtures")
REFERENCE = Path(os.environ.get("LYCORIS_FIXTURES") or ROOT.parent / "shared" / "fixtures")
CACHE = ROOT / ".cache" / "golden-expected"
FINGERPRINTS = FIXTURES / "expected_fingerprints.json"
N_PROBES = 8

_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


# --- the committed files ---------------------------------------------------------------------

def read_json(name: str) -> dict:
    """A JSON file of tests/fixtures (`name.gz` when only the compressed copy is committed)."""
    path = FIXTURES / name
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    with gzip.open(FIXTURES / f"{name}.gz", "rt", encoding="utf-8") as fh:
        return json.load(fh)


@functools.cache
def index() -> dict:
    """The references' case index: {case: {arch, algo, modules: [{lora_name, comfyui_key, …}], …}}."""
    return read_json("index.json")["cases"]


def cases() -> list[str]:
    """Names of the golden cases; an error (not an empty list, which pytest would skip) if none."""
    names = sorted(c for c in index() if (FIXTURES / f"{c}.safetensors").is_file())
    if len(names) != len(index()):
        raise RuntimeError(f"tests/fixtures lacks adapter files of {sorted(set(index()) - set(names))}")
    return names


def arch(case: str) -> str:
    return index()[case]["arch"]


def adapter_file(case: str) -> Path:
    return FIXTURES / f"{case}.safetensors"


def base_file(case: str) -> Path | None:
    """The base weight W0 of a DoRA case (stored as float16, exact), else None."""
    path = FIXTURES / f"{case}.base.safetensors"
    return path if path.is_file() else None


def base_weights(case: str) -> dict[str, torch.Tensor]:
    """{ComfyUI key: W0 as float32} of a DoRA case; {} for the others."""
    path = base_file(case)
    return {k: v.float() for k, v in load_file(path).items()} if path else {}


def sdscripts_targets() -> dict:
    """The module lists sd-scripts' LoHa/LoKr create by default (SDXL with conv_dim, Anima)."""
    return read_json("sdscripts_targets.json")


# --- the oracle --------------------------------------------------------------------------------

def _delta_of_module(tensors: dict[str, torch.Tensor], shape: tuple[int, ...],
                     w0: torch.Tensor | None) -> torch.Tensor:
    """ΔW of one module in float64, from its tensors {suffix: tensor} (float64), shaped `shape`.

    LoHa: `loha.diff_weight` with gamma = alpha / R (R = hada_w1_b.shape[0]). LoKr:
    `lokr.diff_weight` with gamma = alpha, the library dividing by the rank itself (1 when both
    halves are full), except with a Tucker `lokr_t2`, where lycoris 4.1.3 reads the rank from the
    wrong axis (SPEC §5): then `kron_weight` gets alpha / R with R = t2.shape[0]. DoRA: what
    lycoris' forward adds, `weight_decompose(W0 + ΔW) − W0` (never its merge path, which scales
    twice), with float64's eps, as the stored references.
    """
    from lycoris.functional import general, loha, lokr

    known = set(_LOHA) | set(_LOKR) | {"alpha", "dora_scale"}
    if set(tensors) - known:
        raise ValueError(f"the oracle does not know {sorted(set(tensors) - known)}")
    alpha = tensors.get("alpha")
    if "hada_w1_a" in tensors:
        w1a, w1b, w2a, w2b, t1, t2 = (tensors.get(s) for s in _LOHA)
        rank = w1b.shape[0]
        a = float(alpha.item()) if alpha is not None and alpha.item() != 0 else rank
        delta = loha.diff_weight(w1b, w1a, w2b, w2a, t1, t2, gamma=a / rank, backend="torch")
    else:
        w1, w1a, w1b, w2, w2a, w2b, t2 = (tensors.get(s) for s in _LOKR)
        rank = next((f.shape[0] for f in (t2, w1b, w2b) if f is not None), None)
        a = float(alpha.item()) if alpha is not None and alpha.item() != 0 else float(rank or 1)
        if t2 is not None:
            delta = lokr.kron_weight(w1, w1a, w1b, w2, w2a, w2b, t2, scale=a / rank, backend="torch")
        else:
            delta = lokr.diff_weight(w1, w1a, w1b, w2, w2a, w2b, None, gamma=a, backend="torch")
    delta = delta.reshape(shape)
    scale = tensors.get("dora_scale")
    if scale is None:
        return delta
    if w0 is None:
        raise ValueError("a DoRA module needs its base weight")
    on_out = scale.shape[0] == shape[0] and scale.numel() == shape[0]
    return general.weight_decompose(w0 + delta, scale, 1, on_out, backend="torch") - w0


def oracle_delta(adapter: Path, modules: list[dict], base: Path | None = None) -> dict[str, torch.Tensor]:
    """{ComfyUI key: ΔW float32} of the modules `[{lora_name, comfyui_key, weight_shape}]` of an
    adapter file, computed by lycoris-lora in float64 and rounded once."""
    raw = {k: v.double() for k, v in load_file(adapter).items()}
    w0 = {k: v.double() for k, v in load_file(base).items()} if base else {}
    out = {}
    for rec in modules:
        prefix = rec["lora_name"] + "."
        tensors = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
        key = rec["comfyui_key"]
        out[key] = _delta_of_module(tensors, tuple(rec["weight_shape"]), w0.get(key)).float().contiguous()
    return out


def _file_hash(path: Path | None) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path else "-"


def _cache_key(case: str) -> str:
    parts = [_file_hash(adapter_file(case)), _file_hash(base_file(case)),
             json.dumps([[m["lora_name"], m["comfyui_key"], m["weight_shape"]] for m in index()[case]["modules"]]),
             "lycoris-lora " + version("lycoris-lora"), "torch " + torch.__version__,
             hashlib.sha256(Path(__file__).read_bytes()).hexdigest()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


@functools.cache
def _expected_cached(case: str) -> dict[str, torch.Tensor]:
    path = CACHE / f"{case}-{_cache_key(case)}.safetensors"
    if path.is_file():
        return load_file(path)
    out = oracle_delta(adapter_file(case), index()[case]["modules"], base_file(case))
    try:
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(out, str(tmp), metadata={"case": case, "oracle": "lycoris-lora " + version("lycoris-lora")})
        os.replace(tmp, path)
    except OSError:  # a read-only checkout still runs, paying again next time
        pass
    return out


def expected(case: str) -> dict[str, torch.Tensor]:
    """{ComfyUI key: expected ΔW (float32, strength 1; DoRA: W' − W0)} of a golden case (a copy)."""
    return {k: v.clone() for k, v in _expected_cached(case).items()}


# --- fingerprints: the stored references, in a few numbers ---------------------------------------

def fingerprint(delta: torch.Tensor) -> list[float]:
    """Projections of the flattened ΔW on N_PROBES fixed cosine patterns (unit norm), float64.
    Each is at most ‖ΔW‖; a wrong value, scale or layout moves them by about ‖ΔW‖/√numel."""
    x = delta.double().flatten()
    i = torch.arange(x.numel(), dtype=torch.float64)
    out = []
    for j in range(N_PROBES):
        probe = torch.cos(i * (0.6180339887 * (j + 1)) + j)
        out.append(float(x @ probe) / float(probe.norm()))
    return out


def fingerprint_error(delta: torch.Tensor, recorded: dict) -> float:
    """max |projection − recorded| / ‖ΔW_ref‖ (the bound of any projection)."""
    got = fingerprint(delta)
    return max(abs(g - w) for g, w in zip(got, recorded["probes"], strict=True)) / recorded["norm"]


def reference_fingerprints(folder: Path = REFERENCE) -> dict:
    """{case: {ComfyUI key: {norm, probes}}} of the stored reference ΔW files in `folder`."""
    out = {}
    for case in cases():
        ref = load_file(folder / f"{case}.expected.safetensors")
        out[case] = {k: {"norm": float(v.double().norm()), "probes": fingerprint(v)} for k, v in sorted(ref.items())}
    return out


def recorded_fingerprints() -> dict:
    return json.loads(FINGERPRINTS.read_text(encoding="utf-8"))["cases"]


def _write_fingerprints() -> None:
    about = (f"Taken by `python tests/goldens.py fingerprints` from the stored reference ΔW files "
             f"(<case>.expected.safetensors of the references' fixtures folder): per ComfyUI key, "
             f"the Frobenius norm and {N_PROBES} projections on fixed cosine patterns (goldens.fingerprint).")
    data = {"about": about, "cases": reference_fingerprints()}
    FINGERPRINTS.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {FINGERPRINTS} from {REFERENCE}")


if __name__ == "__main__":
    if sys.argv[1:] != ["fingerprints"]:
        sys.exit(__doc__)
    _write_fingerprints()
