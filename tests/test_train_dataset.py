"""lycoris_core.train.dataset without ComfyUI: kohya folder layout, sd-scripts' bucket rules,
caption options, epochs, and the epoch sampler's exact resume. Expected numbers are worked out
by hand from sd-scripts' rules (make_bucket_resolutions / select_bucket / process_caption)."""

from __future__ import annotations

import math

import pytest
import torch

from lycoris_core.train.dataset import (
    BucketOptions,
    CaptionOptions,
    EpochSampler,
    balance_reg_repeats,
    batches_per_epoch,
    bucket_resolutions,
    crop_box,
    epoch_batches,
    parse_subset_name,
    process_caption,
    scan_kohya_folder,
    select_bucket,
    steps_for_epochs,
)

OPTS = BucketOptions(resolution=(64, 64), min_bucket_reso=32, max_bucket_reso=128,
                     bucket_reso_steps=8)


def test_predefined_buckets_follow_make_bucket_resolutions():
    resos = bucket_resolutions(OPTS)
    # area 64² in 8-px units = 64 units: width w gets height (64 // (w/8)) * 8, capped at 128
    expected_pairs = {32: 128, 40: 96, 48: 80, 56: 72, 64: 64, 72: 56, 80: 48, 88: 40, 96: 40,
                      104: 32, 112: 32, 120: 32, 128: 32}
    expected = set()
    for w, h in expected_pairs.items():
        expected |= {(w, h), (h, w)}
    assert set(resos) == expected and resos == sorted(resos)
    assert all(w * h <= 128 * 40 for w, h in resos)


@pytest.mark.parametrize("size,reso,resized", [
    ((64, 64), (64, 64), (64, 64)),     # a predefined bucket: as is
    ((64, 96), (48, 80), (53, 80)),     # ar 0.667: nearest 48×80 (0.6); height matched, crop
    ((96, 64), (80, 48), (80, 53)),
    ((100, 50), (88, 40), (88, 44)),    # ar 2: nearest 88×40 (2.2); width matched
    ((640, 640), (64, 64), (64, 64)),   # large images are scaled down to the bucket
    ((30, 45), (48, 80), (53, 80)),     # small images are scaled up (no bucket_no_upscale)
])
def test_select_bucket(size, reso, resized):
    choice = select_bucket(*size, OPTS)
    assert choice.reso == reso and choice.resized == resized
    assert math.isclose(choice.ar_error, reso[0] / reso[1] - size[0] / size[1])


@pytest.mark.parametrize("size,reso,resized", [
    ((200, 100), (80, 40), (80, 40)),   # area 20000 > 4096: shrunk to ar-exact 80×40
    ((30, 20), (24, 16), (30, 20)),     # small: never upscaled, cropped to the 8-px step
    # area 6144 > 4096: 52.3×78.4; width route 48 → 72 and height route 72 → 48 tie, the
    # height route is taken: 48×72
    ((64, 96), (48, 72), (48, 72)),
])
def test_select_bucket_no_upscale(size, reso, resized):
    opts = BucketOptions(resolution=(64, 64), min_bucket_reso=32, max_bucket_reso=128,
                         bucket_reso_steps=8, bucket_no_upscale=True)
    choice = select_bucket(*size, opts)
    assert choice.reso == reso and choice.resized == resized


def test_crop_box_is_centred():
    assert crop_box((53, 80), (48, 80)) == (2, 0, 50, 80)
    assert crop_box((88, 44), (88, 40)) == (0, 2, 88, 42)


def test_subset_names():
    assert parse_subset_name("2_acc pattern") == (2, "acc pattern")
    assert parse_subset_name("10_a_b") == (10, "a_b")
    assert parse_subset_name("3_") == (3, "")
    assert parse_subset_name("0_x") is None and parse_subset_name("x_2") is None
    assert parse_subset_name("reg") is None


def test_scan_kohya_folder(tmp_path):
    a, b, bad = tmp_path / "2_acc pattern", tmp_path / "1_other", tmp_path / "notes"
    for d in (a, b, bad):
        d.mkdir()
    for name in ("x.png", "y.jpg", "z.webp"):
        (a / name).write_bytes(b"")
    (a / "x.txt").write_text("tag one, tag two\nsecond line ignored\n", encoding="utf-8")
    (a / "y.txt").write_bytes(b"\xff\xfe bad")          # not UTF-8 → class name, reported
    (b / "w.png").write_bytes(b"")
    (b / "w.caption").write_text("other caption", encoding="utf-8")
    (bad / "q.png").write_bytes(b"")
    (tmp_path / "loose.png").write_bytes(b"")
    scan = scan_kohya_folder(tmp_path, ".caption")
    got = {e.path: (e.num_repeats, e.caption, e.caption_source) for e in scan.entries}
    assert got == {"1_other/w.png": (1, "other caption", "file"),
                   "2_acc pattern/x.png": (2, "acc pattern", "class"),   # .txt is not the ext
                   "2_acc pattern/y.jpg": (2, "acc pattern", "class"),
                   "2_acc pattern/z.webp": (2, "acc pattern", "class")}
    scan = scan_kohya_folder(tmp_path, ".txt")
    got = {e.path: (e.caption, e.caption_source) for e in scan.entries}
    assert got["2_acc pattern/x.png"] == ("tag one, tag two", "file")
    assert got["2_acc pattern/y.jpg"] == ("acc pattern", "class")
    assert any("y.txt" in r and "not UTF-8" in r for r in scan.report)
    assert any("notes" in r for r in scan.report) and any("loose" in r or "directly" in r
                                                          for r in scan.report)
    assert [(s.folder, s.num_repeats, s.images) for s in scan.subsets] == [
        ("1_other", 1, 1), ("2_acc pattern", 2, 3)]


def test_caption_options():
    g = torch.Generator().manual_seed(0)
    cap = "a, b, c, d, e"
    assert process_caption(cap, CaptionOptions(caption_prefix="pre", caption_suffix="suf")) == \
        "pre a, b, c, d, e suf"
    assert process_caption(cap, CaptionOptions(caption_dropout_rate=1.0), g) == ""
    assert process_caption(cap, CaptionOptions(caption_tag_dropout_rate=1.0, keep_tokens=2), g) == "a, b"
    seen = set()
    for _ in range(40):
        out = process_caption(cap, CaptionOptions(shuffle_caption=True, keep_tokens=1), g)
        tags = out.split(", ")
        assert tags[0] == "a" and sorted(tags) == ["a", "b", "c", "d", "e"]
        seen.add(out)
    assert len(seen) > 5  # 4! = 24 orders of the flexible part
    sep = CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||", keep_tokens=4)
    for _ in range(20):
        tags = process_caption("x, y ||| p, q, r ||| z", sep, g).split(", ")
        assert tags[:2] == ["x", "y"] and tags[-1] == "z" and sorted(tags[2:5]) == ["p", "q", "r"]
    # tag dropout at 0.5 keeps about half the flexible tags
    kept = sum(len(process_caption(cap, CaptionOptions(caption_tag_dropout_rate=0.5), g).split(", "))
               for _ in range(400))
    assert 0.4 * 2000 < kept < 0.6 * 2000
    # without shuffle / tag dropout the caption is left as written
    assert process_caption("a,b ,c", CaptionOptions(keep_tokens=1)) == "a,b ,c"
    # the same generator state gives the same draw (resume)
    s = torch.Generator().manual_seed(5)
    t = torch.Generator().manual_seed(5)
    opts = CaptionOptions(shuffle_caption=True, caption_tag_dropout_rate=0.3, caption_dropout_rate=0.1)
    assert [process_caption(cap, opts, s) for _ in range(10)] == \
        [process_caption(cap, opts, t) for _ in range(10)]


def test_items_per_epoch_with_repeats_and_buckets():
    # 3 images × 2 repeats in bucket A, 1 × 2 in B, 2 × 1 in C; batch 2
    buckets = ["A", "A", "A", "B", "C", "C"]
    repeats = [2, 2, 2, 2, 1, 1]
    assert batches_per_epoch(buckets, repeats, 2) == 3 + 1 + 1
    assert batches_per_epoch(buckets, repeats, 4) == 2 + 1 + 1
    assert batches_per_epoch(buckets, repeats, 1) == 10
    g = torch.Generator().manual_seed(0)
    batches = epoch_batches(buckets, repeats, 4, g)
    assert len(batches) == 4
    flat = sorted(i for b in batches for i in b)
    assert flat == [0, 0, 1, 1, 2, 2, 3, 3, 4, 5]                 # each item × its repeats
    assert all(len({buckets[i] for i in b}) == 1 for b in batches)  # one bucket per batch
    assert steps_for_epochs(3, 5, 2) == 9 and steps_for_epochs(2, 4, 1) == 8


def test_epoch_sampler_resumes_mid_epoch_exactly():
    buckets = ["A", "A", "B", "B", "B"]
    repeats = [3, 1, 2, 2, 1]
    ends: list[int] = []
    full = EpochSampler(buckets, repeats, 2, seed=4, on_epoch_end=ends.append)
    n = full.batches
    assert n == 2 + 3
    seq = [full.next_batch() for _ in range(3 * n)]
    assert ends == [1, 2, 3]
    # every epoch holds each item × repeats
    for e in range(3):
        assert sorted(i for b in seq[e * n:(e + 1) * n] for i in b) == [0, 0, 0, 1, 2, 2, 3, 3, 4]
    assert seq[:n] != seq[n:2 * n]  # epochs are reshuffled
    half = EpochSampler(buckets, repeats, 2, seed=4)
    first = [half.next_batch() for _ in range(n + 2)]  # stop mid-epoch 2
    state = half.state()
    assert state["epoch"] == 1 and state["position"] == 2
    again = EpochSampler(buckets, repeats, 2, seed=0)
    again.load_state(state)
    assert first + [again.next_batch() for _ in range(2 * n - 2)] == seq
    with pytest.raises(ValueError, match="batches per epoch"):
        EpochSampler(buckets, [1] * 5, 2).load_state(state)


def test_bucket_options_are_checked():
    with pytest.raises(ValueError):
        BucketOptions(min_bucket_reso=512, max_bucket_reso=256)
    with pytest.raises(ValueError):
        BucketOptions(min_bucket_reso=32, bucket_reso_steps=64)
    with pytest.raises(ValueError):
        CaptionOptions(caption_dropout_rate=float("nan"))


def test_sdscripts_dataset_toml_round_trips():
    import dataclasses

    import tomllib

    from lycoris_core.train.dataset import DatasetDescription, SubsetInfo
    from lycoris_core.train.sdscripts import dataset_config_toml, description_from_toml

    desc = DatasetDescription(
        "/data/acc \"train\"\\x",
        [SubsetInfo("1_other", 1, "other", 2), SubsetInfo("2_acc pattern", 2, "acc pattern", 4),
         SubsetInfo("10_é_ü", 10, "é_ü", 1)],
        BucketOptions((768, 512), True, 320, 1536, 32, True),
        CaptionOptions(".caption", True, 2, "|||", ";", 0.05, 0.1, "pre, fix", "suf\"fix"),
        flip_aug=True, batch_size=3, reg_dir="/data/reg", validation_split=0.25,
        validation_seed=7)
    desc.subsets.append(SubsetInfo("1_person", 1, "person", 5, is_reg=True))
    text = dataset_config_toml(desc)
    doc = tomllib.loads(text)
    ds = doc["datasets"][0]
    assert ds["resolution"] == [768, 512] and ds["batch_size"] == 3 and ds["bucket_reso_steps"] == 32
    assert ds["min_bucket_reso"] == 320 and ds["max_bucket_reso"] == 1536 and ds["bucket_no_upscale"]
    assert [(s["image_dir"], s["num_repeats"], s["class_tokens"]) for s in ds["subsets"]] == [
        ("/data/acc \"train\"\\x/1_other", 1, "other"),
        ("/data/acc \"train\"\\x/2_acc pattern", 2, "acc pattern"),
        ("/data/acc \"train\"\\x/10_é_ü", 10, "é_ü"), ("/data/reg/1_person", 1, "person")]
    assert [s.get("is_reg", False) for s in ds["subsets"]] == [False, False, False, True]
    assert ds["validation_split"] == 0.25 and ds["validation_seed"] == 7
    assert all(s["keep_tokens_separator"] == "|||" and s["caption_dropout_rate"] == 0.05
               for s in ds["subsets"])
    back = description_from_toml(doc)
    expected = dataclasses.replace(desc, subsets=[dataclasses.replace(s, images=0)
                                                  for s in desc.subsets])
    assert back == expected
    square = dataset_config_toml(dataclasses.replace(desc, buckets=BucketOptions((1024, 1024)),
                                                     validation_split=0.0))
    square_ds = tomllib.loads(square)["datasets"][0]
    assert square_ds["resolution"] == 1024 and "validation_split" not in square_ds


def test_regularisation_items_balanced_as_sd_scripts():
    # fewer reg items than training items: all registered, then +1 each in turn until equal
    assert balance_reg_repeats(10, [1, 1, 1]) == [4, 3, 3]           # 3 → 10: +1 ×7 in turn
    assert balance_reg_repeats(9, [2, 1]) == [5, 4]                   # 3, then +1 ×6
    assert balance_reg_repeats(6, [3, 3]) == [3, 3]                   # already equal
    # more reg items than training items: the first ones until the count is reached, the
    # one that crosses it keeps all its repeats (sd-scripts overshoots), the rest unused
    assert balance_reg_repeats(5, [2, 2, 2, 2]) == [2, 2, 2, 0]      # 2+2+2 = 6 ≥ 5
    assert balance_reg_repeats(4, [1] * 6) == [1, 1, 1, 1, 0, 0]
    assert balance_reg_repeats(0, [1, 1]) == [0, 0] and balance_reg_repeats(3, []) == []
    for train, reg in [(10, [1, 1, 1]), (9, [2, 1]), (17, [3, 1, 2])]:
        assert sum(balance_reg_repeats(train, reg)) == train        # short: exactly balanced
    with pytest.raises(ValueError):
        balance_reg_repeats(3, [0, 1])


def test_sample_prompts_in_sdscripts_format():
    from lycoris_core.train.samples import SamplePrompt, parse_sample_prompts, sample_steps

    got = parse_sample_prompts("# comment\n\na dog --n blurry, bad --w 100 --h 64 --s 4 --l 5.5 --d 7\n"
                               "  a cat  \n")
    assert got == [SamplePrompt("a dog", "blurry, bad", 96, 64, 4, 5.5, 7), SamplePrompt("a cat")]
    for bad, msg in [("x --w 4", "outside"), ("x --s many", "number"), ("x --q 1", "unknown"),
                     ("x --l nan", "outside")]:
        with pytest.raises(ValueError, match=msg):
            parse_sample_prompts(bad)
    assert sample_steps(2, 5) == [2, 4] and sample_steps(0, 5) == [] and sample_steps(3, 9, 3) == [6, 9]


def test_save_last_n_steps_rule():
    from lycoris_core.train.saves import step_to_remove

    # sd-scripts' example: every 10, last 30 → at step 50 the save of step 10 goes
    assert step_to_remove(50, 30, 10) == 10 and step_to_remove(40, 30, 10) == 0  # never saved
    assert step_to_remove(30, 30, 10) is None
    assert [step_to_remove(s, 3, 2) for s in (2, 4, 6, 8)] == [None, 0, 2, 4]
    assert [step_to_remove(s, 5, 3) for s in (3, 6, 9, 12)] == [None, 0, 3, 6]
    assert step_to_remove(50, 0, 10) is None and step_to_remove(50, 30, 0) is None
