"""The load audit: accepted formats load every trunk tensor exactly; partial or unsafe loads are refused."""
import os

import pytest
import torch

from transfer.artifact import (BackboneArtifact, Preprocessing, build_backbone, high_pass, read_artifact,
                               save_artifact, trunk_state_dict, weights_hash)
from transfer.loading import CheckpointError, load_backbone, to_artifact

ARCH, WIDTH = "resnet50", 16  # slim ResNet-50: real key names, small tensors


@pytest.fixture(scope="module")
def source_state():
    torch.manual_seed(1)
    model = build_backbone(ARCH, width=WIDTH)
    for p in model.parameters():  # make every tensor distinct from a fresh init
        p.data.add_(0.01 * torch.randn_like(p))
    state = model.state_dict()
    state["fc.weight"], state["fc.bias"] = torch.randn(10, 512), torch.randn(10)
    return state


def assert_trunk_equals(backbone, state, prefix=""):
    loaded = backbone.trunk.state_dict()
    for key, value in loaded.items():
        if key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(value, state[prefix + key]), key


def test_torchvision_state_dict(tmp_path, source_state):
    path = tmp_path / "tv.pth"
    torch.save(source_state, path)
    backbone, report = load_backbone(path)
    assert report.format == "torchvision" and report.ok and backbone.arch == ARCH
    assert report.count("matched") == 265 and set(report.dropped) == {"fc.weight", "fc.bias"}
    assert_trunk_equals(backbone, source_state)


def test_moco_v2_checkpoint(tmp_path, source_state):
    trunk = {k: v for k, v in source_state.items() if not k.startswith("fc.")}
    ckpt = {"epoch": 200, "arch": "resnet50", "optimizer": {"state": {}, "param_groups": [{"lr": 0.03}]},
            "state_dict": {**{f"module.encoder_q.{k}": v for k, v in trunk.items()},
                           "module.encoder_q.fc.0.weight": torch.randn(512, 512),
                           "module.encoder_q.fc.2.weight": torch.randn(128, 512),
                           **{f"module.encoder_k.{k}": v + 1 for k, v in trunk.items()},
                           "module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1)}}
    path = tmp_path / "moco_v2_200ep.pth.tar"
    torch.save(ckpt, path)
    backbone, report = load_backbone(path)
    assert report.format == "moco" and report.ok
    assert_trunk_equals(backbone, ckpt["state_dict"], prefix="module.encoder_q.")
    reasons = set(report.dropped.values())
    assert {"momentum (key) encoder", "MoCo negative queue", "classifier / projection head (fc)"} <= reasons
    assert backbone.artifact_meta["provenance"]["method"] == "moco"


def test_own_artifact_roundtrip(tmp_path, source_state):
    trunk = {k: v for k, v in source_state.items() if not k.startswith("fc.")}
    art = BackboneArtifact(ARCH, trunk, Preprocessing(highpass_sigma=1.5), {"method": "mscn-simclr", "epochs": 3},
                           {"width": WIDTH})
    path = save_artifact(tmp_path / "a.safetensors", art)
    again = read_artifact(path)
    assert again.preprocessing.highpass_sigma == 1.5 and again.provenance["method"] == "mscn-simclr"
    assert again.hash == art.hash == weights_hash(trunk)
    backbone, report = load_backbone(path)
    assert report.format == "bench" and report.ok
    assert_trunk_equals(backbone, trunk)
    # the artifact's high-pass filter is part of the backbone's input pipeline
    x = torch.rand(2, 3, 32, 32)
    backbone.eval()
    filtered = high_pass((x - backbone.transform.mean) / backbone.transform.std, 1.5)
    torch.testing.assert_close(backbone.transform(x), filtered)
    torch.testing.assert_close(backbone(x), backbone.trunk(filtered))


def test_refuses_missing_trunk_tensor(tmp_path, source_state):
    broken = dict(source_state)
    del broken["layer3.1.conv2.weight"]
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    with pytest.raises(CheckpointError) as err:
        load_backbone(path, arch=ARCH)
    message = str(err.value)
    assert str(path) in message and "layer3.1.conv2.weight" in message and "refused" in message
    # explicit override loads the rest and keeps the audit
    backbone, report = load_backbone(path, arch=ARCH, allow_partial=True)
    assert not report.ok and report.modules["layer3"]["missing"] == ["layer3.1.conv2.weight"]


def test_refuses_shape_mismatch(tmp_path, source_state):
    art, _ = to_artifact(_save(tmp_path / "ok.pth", source_state))
    bad = dict(source_state)
    bad["layer4.0.conv1.weight"] = torch.randn(1, 1, 1, 1)
    with pytest.raises(CheckpointError, match="wrong shape|shape_mismatch"):
        load_backbone(_save(tmp_path / "bad.pth", bad), arch=art.arch)


def test_refuses_wrong_arch(tmp_path, source_state):
    with pytest.raises(CheckpointError, match="resnet18"):
        to_artifact(_save(tmp_path / "ok.pth", source_state), arch="resnet18")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_never_unpickles_code(tmp_path, source_state, zip_format):
    """A payload among the weights refuses the file, naming the global; one in an entry bench drops is stood in
    by an inert placeholder (noted in the audit). Neither ever runs."""
    marker = tmp_path / "pwned"
    inside = {"state_dict": {**source_state, "layer1.0.conv1.weight": _Payload(marker)}}
    path = tmp_path / "evil.pth"
    torch.save(inside, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match=r"refused: entry 'state_dict', which holds the weights, holds "
                                              r"pickled objects of posix\.system"):
        load_backbone(path)
    beside = {"state_dict": source_state, "extra": _Payload(marker)}
    torch.save(beside, path, _use_new_zipfile_serialization=zip_format)
    backbone, report = load_backbone(path)
    assert report.ok and any("'extra'" in n and "posix.system" in n and "nothing imported or run" in n
                             for n in report.notes), report.notes
    assert_trunk_equals(backbone, source_state)
    assert not marker.exists()


def test_corrupt_and_unknown_files(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt.pth"):
        load_backbone(corrupt)
    unknown = _save(tmp_path / "unknown.pth", {"decoder.weight": torch.randn(3, 3)})
    with pytest.raises(CheckpointError, match="no known checkpoint layout"):
        load_backbone(unknown)


def test_random_artifact_is_seeded():
    from transfer.artifact import random_artifact

    assert random_artifact("resnet18", seed=3).hash == random_artifact("resnet18", seed=3).hash
    assert random_artifact("resnet18", seed=3).hash != random_artifact("resnet18", seed=4).hash


def test_vit_artifact_and_arch_inference(tmp_path):
    model = build_backbone("vit_tiny_patch16", img_size=32)
    state = trunk_state_dict(model)
    path = _save(tmp_path / "vit.pth", {"model": state})
    backbone, report = load_backbone(path)
    assert report.ok and backbone.arch == "vit_tiny_patch16" and backbone.family == "vit"
    assert backbone(torch.rand(2, 3, 32, 32)).shape == (2, 192)
    del state["blocks.3.attn.qkv.weight"]
    with pytest.raises(CheckpointError, match="blocks.3"):
        load_backbone(_save(tmp_path / "vit_broken.pth", {"model": state}))


def _save(path, obj):
    torch.save(obj, path)
    return path
