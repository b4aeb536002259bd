"""Dataset files that must be refused when the split is read, naming the file (issue 18): labels outside the
classes, annotation sizes, corrupt images (also inside a data-loader worker), corrupt feature-cache entries."""
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transfer.datasets import LayoutError, check_layout, error_text, load_ade20k, load_classification


def hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def jpeg(path: Path, size=(16, 16), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(path, quality=90)
    return path


def places(root: Path, train_labels, val_labels) -> Path:
    base = root / "places205"
    for split, labels in (("train", train_labels), ("val", val_labels)):
        lines = []
        for i, label in enumerate(labels):
            rel = f"c/class{label}/{split}_{i}.jpg"
            jpeg(base / "images256" / rel, seed=i)
            lines.append(f"{rel} {label}\n")
        listing = base / "trainvalsplit_places205" / f"{split}_places205.csv"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("".join(lines))
    return root


def test_places_labels_are_the_real_classes(tmp_path):
    root = places(tmp_path / "ok", [0, 1, 2, 1], [2, 0])
    assert load_classification("places205", root, "val").num_classes == 3
    root = places(tmp_path / "big", [0, 1, 205], [0])
    with pytest.raises(LayoutError, match=r"train_places205.csv:3: label 205 of .* outside Places205's 205 classes"):
        load_classification("places205", root, "train")
    root = places(tmp_path / "gap", [0, 1, 7], [0])  # would silently grow the head to 8 classes
    with pytest.raises(LayoutError, match=r"train_places205.csv: labels \[2, 3, 4, 5, 6\] have no train image"):
        load_classification("places205", root, "train")
    root = places(tmp_path / "unseen", [0, 1], [0, 2])
    with pytest.raises(LayoutError, match=r"val_places205.csv: labels \[2\] have no train image"):
        load_classification("places205", root, "val")


def test_classification_paths_are_absolute(tmp_path, monkeypatch):
    """The feature cache keys on sample paths: a relative and an absolute --data-root must give the same key."""
    root = places(tmp_path / "p", [0, 1], [1])
    monkeypatch.chdir(tmp_path)
    relative = load_classification("places205", "p", "train").samples
    assert relative == load_classification("places205", root, "train").samples and relative[0][0].is_absolute()


def ade(root: Path, ann_size=(20, 16), label=7, mode="L") -> Path:
    base = root / "ADEChallengeData2016"
    for split, prefix in (("training", "train"), ("validation", "val")):
        jpeg(base / "images" / split / f"ADE_{prefix}_00000001.jpg", size=(20, 16))
        ann = base / "annotations" / split / f"ADE_{prefix}_00000001.png"
        ann.parent.mkdir(parents=True, exist_ok=True)
        labels = np.full((ann_size[1], ann_size[0]), label, np.uint8)
        Image.fromarray(labels).convert(mode).save(ann)
    return root


def test_ade20k_sizes_and_labels_are_checked_when_the_split_is_read(tmp_path):
    check_layout("ade20k", ade(tmp_path / "ok"))
    with pytest.raises(LayoutError, match=r"ADE_train_00000001.png: annotation size 24x16 differs from its image "
                                          r"ADE_train_00000001.jpg \(20x16\)"):
        load_ade20k(ade(tmp_path / "size", ann_size=(24, 16)), "training")
    with pytest.raises(LayoutError, match=r"ADE_train_00000001.png: annotation mode RGB"):
        load_ade20k(ade(tmp_path / "rgb", mode="RGB"), "training")
    root = ade(tmp_path / "label", label=151)
    before = hashes(root)
    with pytest.raises(LayoutError, match=r"ADE_train_00000001.png: label 151 outside ADE20K's classes"):
        check_layout("ade20k", root)  # before training, not on val after it
    assert hashes(root) == before


def test_truncated_jpeg_in_a_worker_is_one_line_naming_the_file(tmp_path):
    from transfer.linear import ImageList
    from transfer.linear import test_transform

    good = jpeg(tmp_path / "good.jpg", size=(64, 64))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(good.read_bytes()[:300])
    loader = torch.utils.data.DataLoader(ImageList([(good, 0), (bad, 1)], test_transform(32, 32)),
                                         batch_size=2, num_workers=1)
    with pytest.raises(LayoutError) as e:
        next(iter(loader))
    assert "Traceback" in str(e.value)  # what torch puts in the re-raised error ...
    text = error_text(e.value)  # ... and what bench prints
    assert text.startswith(f"{bad}: unreadable or corrupt image") and "Traceback" not in text and "\n" not in text


def test_corrupt_feature_cache_entry_is_recomputed(tmp_path, capsys):
    from transfer.linear import read_feature_cache

    path = tmp_path / "inat18-val-abc.pt"
    torch.save({"features": torch.ones(3, 4), "labels": torch.zeros(3, dtype=torch.long)}, path)
    assert read_feature_cache(path, 3)["features"].shape == (3, 4)
    assert read_feature_cache(path, 5) is None  # another split's length
    path.write_bytes(path.read_bytes()[:100])  # truncated by a full disk or a kill
    assert read_feature_cache(path, 3) is None and "extracting again" in capsys.readouterr().out
    torch.save({"features": torch.full((3, 4), float("nan")), "labels": torch.zeros(3)}, path)
    assert read_feature_cache(path, 3) is None
    assert read_feature_cache(tmp_path / "absent.pt", 3) is None
