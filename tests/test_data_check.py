"""`bench data check` on a copy of the miniature data, intact and damaged in one way per test."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from benchmarks.cli import main
from benchmarks.datacheck import REAL_SIZES, check, report


TOP_DIRS = {"voc": ["VOCdevkit"], "coco": ["coco"], "lvis": ["lvis", "coco"], "ade20k": ["ADEChallengeData2016"],
            "inat18": ["inat2018"], "places205": ["places205"]}


def copy_mini(mini_root, tmp_path, *names):
    """A private copy of the miniature data (only the named datasets, all by default) to damage."""
    copy = tmp_path / "data"
    copy.mkdir()
    shutil.copy(mini_root / ".bench-mini.json", copy)
    for top in {d for name in names or TOP_DIRS for d in TOP_DIRS[name]}:
        shutil.copytree(mini_root / top, copy / top)
    return copy


def run_check(root, *names, **kw):
    problems, listed = check(root, names, **kw)
    return problems, report(problems, listed, root)


def test_complete_layout_passes(mini_root, tmp_path, capsys):
    root = copy_mini(mini_root, tmp_path)
    main(["data", "check", "--data-root", str(root)])  # no SystemExit: exit status 0
    out = capsys.readouterr()
    assert "bench data check: OK, 2,906 images in 13 splits" in out.out
    assert "bench data check: 3,166/3,166 (" in out.err  # a plain progress line when not on a terminal


def test_removed_files(mini_root, tmp_path, capsys):
    root = copy_mini(mini_root, tmp_path, "places205", "inat18")
    files = sorted((root / "places205" / "images256" / "b" / "beach").glob("train_*.jpg"))[:2]
    for f in files:
        f.unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "check", "--data-root", str(root), "places205", "inat18"])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("MISSING"))
    assert "places205/train: 2 of 300 checked files missing" in line
    assert str(files[0].relative_to(root)) in line
    assert "fix: re-copy" in out
    assert "1 problem(s)" in out


def test_extra_class(mini_root, tmp_path):
    root = copy_mini(mini_root, tmp_path, "inat18")
    path = root / "inat2018" / "train2018.json"
    data = json.loads(path.read_text())
    data["categories"].append({"id": 99, "name": "stray_species", "supercategory": "Animalia"})
    path.write_text(json.dumps(data))
    problems, text = run_check(root, "inat18")
    assert [p.kind for p in problems] == ["classes"]
    assert "CLASSES    inat18/train: 13 classes, expected 12; e.g. stray_species" in text


def test_truncated_image(mini_root, tmp_path):
    root = copy_mini(mini_root, tmp_path, "voc")
    image = root / "VOCdevkit" / "VOC2007" / "JPEGImages" / "005003.jpg"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    problems, text = run_check(root, "voc07+12")
    assert [(p.kind, p.where, p.count) for p in problems] == [("truncated", "voc/2007_test", 1)]
    assert "TRUNCATED  voc/2007_test: 1 of 100 checked files truncated; e.g. VOCdevkit/VOC2007/JPEGImages/005003.jpg" \
        in text


def test_unreadable_image(mini_root, tmp_path):
    root = copy_mini(mini_root, tmp_path, "coco")
    (root / "coco" / "val2017" / "000000000201.jpg").write_bytes(b"not an image")
    problems, text = run_check(root, "coco")
    assert [(p.kind, p.where) for p in problems] == [("unreadable", "coco/val")]


def test_wrong_count(mini_root, tmp_path):
    root = copy_mini(mini_root, tmp_path, "voc")
    listing = root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "test.txt"
    listing.write_text("".join(listing.read_text().splitlines(keepends=True)[:-1]))
    problems, text = run_check(root, "voc")
    assert [(p.kind, p.where) for p in problems] == [("count", "voc/2007_test")]
    assert "COUNT      voc/2007_test: 99 images listed, expected 100" in text


def test_real_sizes_without_marker(mini_root, tmp_path):
    root = copy_mini(mini_root, tmp_path, "ade20k")
    (root / ".bench-mini.json").unlink()
    problems, text = run_check(root, "ade20k", quick=5)
    assert {(p.kind, p.where) for p in problems} == {("count", "ade20k/training"), ("count", "ade20k/validation")}
    assert f"200 images listed, expected {REAL_SIZES['ade20k'][0]['training']:,}" in text


def test_ade_labels_and_missing_annotation(mini_root, tmp_path):
    root = copy_mini(mini_root, tmp_path, "ade20k")
    ann = root / "ADEChallengeData2016" / "annotations" / "validation"
    Image.fromarray(np.full((8, 8), 200, np.uint8), mode="L").save(ann / "ADE_val_00000001.png")
    (ann / "ADE_val_00000002.png").unlink()
    problems, text = run_check(root, "ade20k")
    assert sorted((p.kind, p.where, p.count) for p in problems) == [
        ("labels", "ade20k/validation", 1), ("missing", "ade20k/validation", 1)]
    assert "no annotation PNG; e.g. ADEChallengeData2016/annotations/validation/ADE_val_00000002.png" in text


def test_quick_samples(mini_root, tmp_path):
    root = copy_mini(mini_root, tmp_path, "places205")
    for image in (root / "places205" / "images256").rglob("val_*.jpg"):
        image.unlink()
    problems, text = run_check(root, "places205", quick=5)
    assert [(p.kind, p.where, p.count) for p in problems] == [("missing", "places205/val", 5)]
    assert "5 of 5 checked files missing" in text and "(--quick" not in text  # report() is told separately
    _, listed = check(root, ["places205"], quick=5)
    assert listed == {"places205/train": 300, "places205/val": 400}  # counts still come from the full lists


def test_missing_dataset_shows_the_expected_layout(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "check", "--data-root", str(tmp_path), "coco-c4-1x", "--quick", "--sample", "3"])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert out.startswith("LAYOUT     coco: ") and "annotations/instances_{train,val}2017.json" in out
    assert "1 problem(s)" in out and "--quick: up to 3 sampled files per split" in out


def test_unknown_voc_class(mini_root, tmp_path):
    root = copy_mini(mini_root, tmp_path, "voc")
    xml = root / "VOCdevkit" / "VOC2012" / "Annotations" / "2008_000001.xml"
    text = xml.read_text()
    name = text.split("<name>")[1].split("</name>")[0]
    xml.write_text(text.replace(f"<name>{name}</name>", "<name>unicorn</name>", 1))
    problems, text = run_check(root, "voc")
    assert [(p.kind, p.where) for p in problems] == [("labels", "voc/2012_trainval")]
    assert "unknown class 'unicorn'" in text
