"""Backbone files that must be refused with one message naming the file (issue 18): corrupt artifact metadata,
unknown architectures, trunk tensors whose dtype would lose values."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from benchmarks.cli import main
from transfer.artifact import ArtifactError, build_backbone, random_artifact, read_artifact, save_artifact
from transfer.loading import CheckpointError, audit, load_backbone, lossy_dtype


def hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return save_artifact(tmp_path_factory.mktemp("art") / "r18.safetensors", random_artifact("resnet18", width=8))


def with_metadata(tmp_path: Path, good: Path, bench_meta: str) -> Path:
    art = read_artifact(good)
    path = tmp_path / "edited.safetensors"
    save_file({k: v.contiguous() for k, v in art.state_dict.items()}, str(path), metadata={"bench": bench_meta})
    return path


@pytest.mark.parametrize("edit,match", [
    (lambda m: m[:-7], r"corrupt bench metadata \(bad JSON"),
    (lambda m: json.dumps({k: v for k, v in json.loads(m).items() if k != "arch"}), r"names no architecture"),
    (lambda m: json.dumps({**json.loads(m), "arch": "resnet9000"}), r"unknown architecture 'resnet9000'"),
    (lambda m: json.dumps({**json.loads(m), "arch": "vit_enormous_patch16"}), r"unknown architecture"),
    (lambda m: json.dumps({**json.loads(m), "arch_kwargs": [8]}), r"'arch_kwargs' is not a mapping"),
])
def test_corrupt_artifact_metadata_is_named(tmp_path, good, edit, match, capsys):
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()["bench"]
    path = with_metadata(tmp_path, good, edit(meta))
    with pytest.raises(ArtifactError, match=rf"{path.name}: .*{match}.*re-export it"):
        read_artifact(path)
    before = hashes(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(path)])
    assert str(path) in str(e.value.code) and "\n" not in str(e.value.code)
    assert hashes(tmp_path) == before


def test_integer_trunk_tensor_is_refused_not_cast(tmp_path):
    state = build_backbone("resnet18", width=8).state_dict()
    state["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"].to(torch.int64)  # all zeros once cast
    torch.save({"state_dict": state}, tmp_path / "int.pth")
    with pytest.raises(CheckpointError, match=r"int.pth: refused: .* 1 with the wrong shape or dtype") as e:
        load_backbone(tmp_path / "int.pth")
    assert "layer1.0.conv1.weight dtype torch.int64 vs torch.float32 (values lost)" in str(e.value)
    backbone, report = load_backbone(tmp_path / "int.pth", allow_partial=True)  # recorded partial: not copied
    assert not report.ok and backbone.trunk.state_dict()["layer1.0.conv1.weight"].abs().sum() > 0
    assert lossy_dtype(torch.zeros(2, dtype=torch.bool), torch.zeros(2)) and not lossy_dtype(
        torch.zeros(2, dtype=torch.float16), torch.zeros(2)) and not lossy_dtype(torch.zeros(2, dtype=torch.float64),
                                                                                  torch.zeros(2))
    buckets = audit({"w": torch.zeros(2)}, {"w": torch.zeros(2, dtype=torch.float64)})
    assert buckets["w"]["matched"] == ["w"]  # float64 -> float32 keeps the values (rounding only)
