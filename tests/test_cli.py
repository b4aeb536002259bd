"""`bench inspect` and `bench backbone convert`: what users see before they trust a checkpoint."""
import pytest
import torch

from benchmarks.cli import main
from transfer.artifact import build_backbone, read_artifact
from transfer.loading import load_backbone


@pytest.fixture(scope="module")
def moco_file(tmp_path_factory):
    torch.manual_seed(2)
    trunk = build_backbone("resnet50", width=8).state_dict()
    ckpt = {"epoch": 200, "state_dict": {**{f"module.encoder_q.{k}": v for k, v in trunk.items()},
                                         "module.encoder_q.fc.0.weight": torch.randn(64, 256),
                                         **{f"module.encoder_k.{k}": v for k, v in trunk.items()},
                                         "module.queue": torch.randn(128, 64)}}
    path = tmp_path_factory.mktemp("ckpt") / "moco_v2.pth.tar"
    torch.save(ckpt, path)
    return path, ckpt


def test_inspect_reports_format_arch_params_drops_and_audit(moco_file, capsys):
    path, ckpt = moco_file
    main(["inspect", str(path)])
    out = capsys.readouterr().out
    n_params = sum(v.numel() for k, v in build_backbone("resnet50", width=8).named_parameters())
    assert "format: moco" in out and "arch: resnet50 {'width': 8}" in out
    assert f"parameters: {n_params / 1e6:.2f}M" in out
    assert "momentum (key) encoder" in out and "MoCo negative queue" in out and "audit: OK" in out


def test_inspect_of_a_partial_file_exits_nonzero(tmp_path, moco_file, capsys):
    _, ckpt = moco_file
    partial = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("module.encoder_q.layer4.2.")}
    torch.save({"state_dict": partial}, tmp_path / "partial.pth")
    with pytest.raises(SystemExit, match=r"partial.pth: ResNet with blocks per stage \(3, 4, 6, 2\).*pass --arch"):
        main(["inspect", str(tmp_path / "partial.pth")])  # the keys alone no longer say which ResNet it is
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(tmp_path / "partial.pth"), "--arch", "resnet50"])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "audit: REFUSED" in out and "layer4.2.conv1.weight" in out


def test_convert_writes_an_artifact_with_the_same_weights(tmp_path, moco_file, capsys):
    path, ckpt = moco_file
    main(["backbone", "convert", str(path), "-o", str(tmp_path / "moco.safetensors"), "--method", "moco-v2",
          "--highpass-sigma", "1.5"])
    art = read_artifact(tmp_path / "moco.safetensors")
    assert art.provenance["method"] == "moco-v2" and art.preprocessing.highpass_sigma == 1.5
    backbone, report = load_backbone(tmp_path / "moco.safetensors")
    assert report.format == "bench" and report.ok
    for key, value in backbone.trunk.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, ckpt["state_dict"]["module.encoder_q." + key]), key


def test_refused_run_names_the_file_and_the_fix(tmp_path, moco_file):
    _, ckpt = moco_file
    partial = {k: v for k, v in ckpt["state_dict"].items() if "layer1.0.bn1" not in k}
    torch.save({"state_dict": partial}, tmp_path / "bad.pth")
    with pytest.raises(SystemExit) as exit_info:
        main(["backbone", "convert", str(tmp_path / "bad.pth"), "-o", str(tmp_path / "out.safetensors")])
    message = str(exit_info.value.code)
    assert "bad.pth" in message and "refused" in message and "--allow-partial-load" in message
    assert not (tmp_path / "out.safetensors").exists()
