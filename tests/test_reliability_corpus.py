"""Every bad input (tests/bad_inputs.py) is refused with `AdapterError` naming the file and key.

No other exception type may escape `load_adapter` + `delta_weights`; header-level damage must be
refused by `load_adapter` itself; no pickle is ever unpickled; a file changed on disk after its
header was read is refused when its tensors are read, not used with the wrong shape.
"""

from __future__ import annotations

import re
import shutil

import bad_inputs as bi
import pytest
import torch
from safetensors.torch import save_file

import lycoris_core as lc


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_inputs")
    return folder, bi.build_corpus(folder)


@pytest.fixture(scope="module")
def model():
    return bi.model_weights()


def _refusal(item: bi.BadInput, model) -> tuple[lc.AdapterError, str]:
    """Run the item through load_adapter + delta_weights; return (error, stage). Any other
    exception type propagates and fails the test."""
    try:
        adapter = lc.load_adapter(item.path)
    except lc.AdapterError as exc:
        return exc, "load"
    try:
        lc.delta_weights(adapter, model)
    except lc.AdapterError as exc:
        return exc, "delta"
    pytest.fail(f"{item.name}: accepted without error")


def test_corpus_is_large_and_the_good_file_passes(corpus, model, tmp_path):
    _, items = corpus
    assert len(items) >= 80, len(items)
    assert len({i.name for i in items}) == len(items)
    deltas, unmatched = lc.delta_weights(lc.load_adapter(bi.good_file(tmp_path)), model)
    assert list(deltas) == [bi.Q_KEY] and unmatched == []
    assert bool(deltas[bi.Q_KEY].abs().max() > 0)


def test_every_item_refused_with_file_and_key(corpus, model):
    """One pass over the whole corpus, collecting every deviation, so a report lists them all."""
    folder, items = corpus
    problems: list[str] = []
    for item in items:
        try:
            exc, stage = _refusal(item, model)
        except BaseException as other:  # noqa: BLE001 - an unexpected type is exactly what we report
            if isinstance(other, pytest.fail.Exception):
                problems.append(str(other))
            else:
                problems.append(f"{item.name}: unexpected {type(other).__name__}: {other}")
            continue
        msg = str(exc)
        if str(item.path) not in msg or exc.file != str(item.path):
            problems.append(f"{item.name}: message does not name the file: {msg[:200]}")
        if item.key is not None and item.key not in msg:
            problems.append(f"{item.name}: message does not name key {item.key!r}: {msg[:300]}")
        if not re.search(item.match, msg):
            problems.append(f"{item.name}: message does not say /{item.match}/: {msg[:300]}")
        if item.at_load and stage != "load":
            problems.append(f"{item.name}: refused only at {stage}, load_adapter accepted it")
    assert not problems, "\n".join(problems)
    assert not (folder / bi.PICKLE_MARKER).exists(), "a pickle was unpickled"


def test_inputs_are_never_modified(corpus, model):
    """Refusing a file never writes to it (sizes and bytes unchanged, no new files)."""
    folder, items = corpus
    regular = [p for p in folder.iterdir() if not p.is_symlink() and p.is_file()]
    before = {p: p.read_bytes() for p in regular if p.stat().st_size < 1 << 20}
    assert len(before) > 50
    listing = sorted(p.name for p in folder.iterdir())
    for item in items:
        try:
            _refusal(item, model)
        except BaseException:  # noqa: BLE001 - types are checked by the test above
            pass
    assert sorted(p.name for p in folder.iterdir()) == listing
    assert all(p.read_bytes() == data for p, data in before.items())


def _swap(path, tensors):
    tmp = path.with_suffix(".swap")
    save_file(tensors, str(tmp))
    shutil.move(tmp, path)


@pytest.mark.parametrize("change", ["shape", "dtype", "truncate", "delete"])
def test_file_changed_after_header_read(tmp_path, model, change):
    """TOCTOU: the header is read by load_adapter, the tensors later. A file replaced or cut in
    between is refused (AdapterError with file and key), never used with the wrong shape."""
    p = bi.good_file(tmp_path)
    adapter = lc.load_adapter(p)
    t = bi.loha()
    key = f"{bi.Q_MOD}.hada_w1_a"
    if change == "shape":
        t[key] = torch.zeros(640, 5)
        t[f"{bi.Q_MOD}.hada_w1_b"] = torch.zeros(5, 640)
        _swap(p, t)
    elif change == "dtype":
        _swap(p, {k: v.half() for k, v in t.items()})
    elif change == "truncate":
        p.write_bytes(p.read_bytes()[:200])
    else:
        p.unlink()
    with pytest.raises(lc.AdapterError, match=bi.TOCTOU_MATCH) as e:
        lc.delta_weights(adapter, model)
    assert str(p) in str(e.value) and bi.Q_MOD in str(e.value)
