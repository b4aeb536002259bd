"""Every published checkpoint layout loads without flags, and every trunk tensor equals its source value.

State dicts are built with the exact key names and shapes of the real files (full ResNet-50 / ViT-S/16 /
ViT-B/16), random values; heads, momentum encoders and decoders ride along and must be dropped with a reason.
"""
import argparse
import os
import pickle

import numpy as np
import pytest
import torch

from transfer.artifact import build_backbone, trunk_state_dict
from transfer.loading import CheckpointError, load_backbone, to_artifact


def _randomised(model):
    state = model.state_dict()
    return {k: (torch.randn_like(v) if v.is_floating_point() else v.clone()) for k, v in state.items()}


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    import torchvision

    return _randomised(torchvision.models.resnet50())  # includes fc.weight / fc.bias, as released files do


@pytest.fixture(scope="module")
def vit_s():
    torch.manual_seed(1)
    import timm

    return _randomised(timm.create_model("vit_small_patch16_224", num_classes=1000))


def _prefixed(state, prefix, skip=("fc.", "head.")):
    return {prefix + k: v for k, v in state.items() if not k.startswith(skip)}


def _mlp(prefix, dims):
    out = {}
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        out[f"{prefix}{3 * i}.weight"] = torch.randn(b, a)
        out[f"{prefix}{3 * i + 1}.weight"], out[f"{prefix}{3 * i + 1}.bias"] = torch.ones(b), torch.zeros(b)
    return out


def check_exact(path, source, key_prefix="", expect_format=None, expect_arch=None, **kw):
    backbone, report = load_backbone(path, **kw)
    assert report.ok, report.summary()
    if expect_format:
        assert report.format == expect_format, report.summary()
    if expect_arch:
        assert backbone.arch == expect_arch
    for key, value in backbone.trunk.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(value, source[key_prefix + key]), key
    return backbone, report


def save(tmp_path, name, obj):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_torchvision_and_timm_resnet(tmp_path, r50):
    _, report = check_exact(save(tmp_path, "resnet50.pth", r50), r50, expect_format="torchvision",
                            expect_arch="resnet50")
    assert set(report.dropped) == {"fc.weight", "fc.bias"}


def test_moco_v3_resnet(tmp_path, r50):
    sd = {**_prefixed(r50, "module.base_encoder."), **_mlp("module.base_encoder.fc.", [2048, 4096, 256]),
          **_prefixed(r50, "module.momentum_encoder.", skip=("fc.",)), **_mlp("module.predictor.", [256, 4096, 256])}
    ckpt = {"epoch": 100, "arch": "resnet50", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []},
            "scaler": {"scale": 65536.0}}
    _, report = check_exact(save(tmp_path, "r-50-100ep.pth.tar", ckpt), sd, "module.base_encoder.",
                            expect_format="moco-v3")
    assert {"momentum encoder", "MoCo v3 predictor"} <= set(report.dropped.values())


def test_moco_v3_vit(tmp_path, vit_s):
    sd = {**_prefixed(vit_s, "module.base_encoder."), **_mlp("module.base_encoder.head.", [384, 4096, 256]),
          **_prefixed(vit_s, "module.momentum_encoder.", skip=("head.",))}
    check_exact(save(tmp_path, "vit-s-300ep.pth.tar", {"state_dict": sd, "epoch": 300}), sd,
                "module.base_encoder.", expect_format="moco-v3", expect_arch="vit_small_patch16")


def test_swav(tmp_path, r50):
    sd = {**_prefixed(r50, "module."), **_mlp("module.projection_head.", [2048, 2048, 128]),
          "module.prototypes.weight": torch.randn(3000, 128)}
    _, report = check_exact(save(tmp_path, "swav_800ep_pretrain.pth.tar", sd), sd, "module.",
                            expect_format="ddp-module")
    assert report.dropped["module.prototypes.weight"] == "SSL projection/prediction head"


def test_dino_full_checkpoint_prefers_teacher(tmp_path, r50):
    student = {**_prefixed(r50, "module.backbone."), "module.head.mlp.0.weight": torch.randn(2048, 2048)}
    teacher = {k.replace("module.backbone.", "backbone."): v + 1 for k, v in student.items() if "backbone" in k}
    teacher["head.mlp.0.weight"] = torch.randn(2048, 2048)
    ckpt = {"student": student, "teacher": teacher, "epoch": 100, "args": argparse.Namespace(arch="resnet50"),
            "dino_loss": {"center": torch.zeros(1, 60000)}}
    _, report = check_exact(save(tmp_path, "checkpoint.pth", ckpt), teacher, "backbone.",
                            expect_format="backbone-prefix")
    assert any("teacher" in note for note in report.notes)
    # the student on request
    check_exact(save(tmp_path, "checkpoint2.pth", ckpt), student, "module.backbone.", state_key="student")


def test_dino_vit_release(tmp_path, vit_s):
    sd = {k: v for k, v in vit_s.items() if not k.startswith("head.")}
    check_exact(save(tmp_path, "dino_deitsmall16_pretrain.pth", sd), sd, expect_format="torchvision",
                expect_arch="vit_small_patch16")


def test_barlow_twins_and_vicreg_training_checkpoints(tmp_path, r50):
    sd = {**_prefixed(r50, "module.backbone."), **_mlp("module.projector.", [2048, 8192, 8192]),
          "module.bn.running_mean": torch.zeros(8192), "module.bn.running_var": torch.ones(8192)}
    ckpt = {"epoch": 1000, "model": sd, "optimizer": {"state": {}, "param_groups": []}}
    check_exact(save(tmp_path, "checkpoint.pth", ckpt), sd, "module.backbone.",
                expect_format="module-backbone-prefix")


def test_vissl(tmp_path, r50):
    trunk = _prefixed(r50, "_feature_blocks.")
    heads = {"0.clf.0.weight": torch.randn(1000, 2048), "0.clf.0.bias": torch.randn(1000)}
    ckpt = {"classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": heads}, "meta": {}},
                                  "meta": {}}, "phase_idx": 799, "iteration": 1000, "type": "checkpoint"}
    _, report = check_exact(save(tmp_path, "model_final_checkpoint_phase799.torch", ckpt), trunk,
                            "_feature_blocks.", expect_format="vissl")
    assert any("classy_state_dict.base_model.model.trunk" in note for note in report.notes)


def test_mmselfsup_and_solo_learn(tmp_path, r50):
    mm = {**_prefixed(r50, "backbone."), "neck.mlp.0.weight": torch.randn(2048, 2048),
          **{f"momentum_encoder.{k}": v for k, v in _prefixed(r50, "backbone.").items()}}
    check_exact(save(tmp_path, "mocov2_mmselfsup.pth", {"meta": {"epoch": 200}, "state_dict": mm}), mm,
                "backbone.", expect_format="backbone-prefix")
    solo = {**_prefixed(r50, "backbone."), **_mlp("projector.", [2048, 4096, 256]),
            "classifier.weight": torch.randn(1000, 2048), "classifier.bias": torch.zeros(1000),
            **{f"momentum_backbone.{k}": v for k, v in _prefixed(r50, "").items()},
            **_mlp("momentum_projector.", [2048, 4096, 256]), **_mlp("predictor.", [256, 4096, 256])}
    _, report = check_exact(save(tmp_path, "byol-imagenet.ckpt", {"state_dict": solo, "epoch": 400,
                                                                  "global_step": 1}), solo, "backbone.")
    assert not any(k.startswith("momentum_backbone.") for k in report.modules.get("layer1", {}).get("matched", []))


def test_adios_lightning(tmp_path):
    torch.manual_seed(2)
    r18 = _randomised(build_backbone("resnet18"))
    sd = {**_prefixed(r18, "encoder."), **_prefixed(r18, "momentum_encoder."),
          **_mlp("projector.", [512, 4096, 256]), "classifier.weight": torch.randn(100, 512),
          "mask_encoder.down.0.weight": torch.randn(8, 3, 3, 3), "mask_head.0.weight": torch.randn(6, 8, 1, 1)}
    backbone, report = check_exact(save(tmp_path, "simclr_adios.ckpt", {"state_dict": sd, "epoch": 500}), sd,
                                   "encoder.", expect_format="lightning-encoder", expect_arch="resnet18")
    assert report.dropped["mask_encoder.down.0.weight"] == "ADIOS occlusion model"
    assert backbone.artifact_meta["provenance"]["method"] == "adios"


@pytest.fixture(scope="module")
def vit_b():
    torch.manual_seed(3)
    import timm

    return _randomised(timm.create_model("vit_base_patch16_224", num_classes=0))


def test_mae_pretrain_checkpoint(tmp_path, vit_b):
    model = dict(vit_b)
    model.update({"mask_token": torch.randn(1, 1, 512), "decoder_embed.weight": torch.randn(512, 768),
                  "decoder_pos_embed": torch.randn(1, 197, 512), "decoder_blocks.0.norm1.weight": torch.ones(512),
                  "decoder_norm.weight": torch.ones(512), "decoder_pred.weight": torch.randn(768, 512)})
    ckpt = {"model": model, "epoch": 1599, "args": argparse.Namespace(model="mae_vit_base_patch16")}
    _, report = check_exact(save(tmp_path, "mae_pretrain_vit_base.pth", ckpt), model,
                            expect_format="torchvision", expect_arch="vit_base_patch16")
    assert report.dropped["decoder_pred.weight"] == "masked-image-modelling decoder"


def test_siameseim_drops_momentum_and_decoders(tmp_path, vit_b):
    model = dict(vit_b)
    model = {k: v for k, v in model.items() if not k.startswith("norm.")}  # the online encoder has no final norm
    model.update({f"mm_{k}": v + 1 for k, v in vit_b.items() if k.startswith(("blocks.0.", "patch_embed", "cls"))})
    model.update({"projector_decoder_blocks.0.norm1.weight": torch.ones(768), "decoder_pos_mlp.0.weight":
                  torch.randn(768, 16), "predictor_decoder_blocks.0.mlp.fc1.weight": torch.randn(3072, 768)})
    backbone, report = check_exact(save(tmp_path, "sim_base_1600ep_pretrain.pth", {"model": model}), model,
                                   expect_arch="vit_base_patch16")
    assert backbone.artifact_meta["arch_kwargs"] == {"final_norm": False}
    assert isinstance(backbone.trunk.norm, torch.nn.Identity)
    assert report.dropped["mm_blocks.0.norm1.weight"] == "momentum / target encoder"


def test_vit_pos_embed_interpolated_with_note(tmp_path, vit_s):
    sd = {k: v for k, v in vit_s.items() if not k.startswith("head.")}
    backbone, report = load_backbone(save(tmp_path, "vit.pth", sd), img_size=64)
    assert backbone.trunk.pos_embed.shape == (1, 17, 384)
    assert any("14x14 -> 4x4" in n for n in report.notes)
    assert backbone(torch.rand(1, 3, 64, 64)).shape == (1, 384)


def test_safetensors_of_a_layout(tmp_path, r50):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in _prefixed(r50, "module.encoder_q.").items()}
    save_file(sd, tmp_path / "moco.safetensors")
    check_exact(tmp_path / "moco.safetensors", sd, "module.encoder_q.", expect_format="moco")


def _to_detectron2(state):
    """MoCo's convert-pretrain-to-detectron2 rules (PROTOCOLS.md), applied to a torchvision state dict."""
    out = {}
    for k, v in state.items():
        if k.startswith("fc."):
            continue
        old = k
        if "layer" not in k:
            k = "stem." + k
        for t in [1, 2, 3, 4]:
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in [1, 2, 3]:
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        k = k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        out[k] = v.numpy()
        assert old
    return out


def test_detectron2_pkl_both_layouts(tmp_path, r50):
    converted = _to_detectron2(r50)
    path = tmp_path / "moco_r50.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": converted, "__author__": "MOCO", "matching_heuristics": True}, f)
    backbone, report = load_backbone(path)
    assert report.format == "detectron2" and report.ok
    check_exact(path, r50, expect_format="detectron2")
    # a trained C4 model: trunk under backbone., res5 inside the ROI heads, plus detection heads
    trained = {("roi_heads." + k if k.startswith("res5") else "backbone." + k): torch.from_numpy(v)
               for k, v in converted.items()}
    trained["roi_heads.box_predictor.cls_score.weight"] = torch.randn(21, 2048)
    trained["proposal_generator.rpn_head.conv.weight"] = torch.randn(1024, 1024, 3, 3)
    _, report = check_exact(save(tmp_path, "model_final.pth", {"model": trained, "iteration": 24000}), r50,
                            expect_format="detectron2")
    assert report.dropped["roi_heads.box_predictor.cls_score.weight"] == "detection heads"


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_plain_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32), "x": _Payload(marker)}}, f)
    with pytest.raises(CheckpointError, match=r"refused: entry 'model', which holds the weights, holds pickled "
                                              r"objects of posix\.system"):
        load_backbone(path)
    assert not marker.exists()


def test_unknown_layout_lists_candidates(tmp_path):
    path = save(tmp_path, "odd.pth", {"net.trunk.conv1.weight": torch.randn(64, 3, 7, 7)})
    with pytest.raises(CheckpointError) as err:
        load_backbone(path)
    assert "moco" in str(err.value) and "net.trunk.conv1.weight" in str(err.value) and "--prefix" in str(err.value)


def test_explicit_prefix(tmp_path, r50):
    sd = _prefixed(r50, "net.trunk.")
    check_exact(save(tmp_path, "odd.pth", sd), sd, "net.trunk.", prefix="net.trunk.")


def test_missing_tensor_in_any_layout_is_refused(tmp_path, r50):
    sd = _prefixed(r50, "module.encoder_q.")
    del sd["module.encoder_q.layer2.1.bn2.running_var"]
    with pytest.raises(CheckpointError, match="layer2.1.bn2.running_var"):
        to_artifact(save(tmp_path, "broken.pth.tar", {"state_dict": sd}))


@pytest.fixture(scope="module")
def convvit_b():
    torch.manual_seed(4)
    state = _randomised(build_backbone("convvit_base"))
    from transfer.convvit import sincos_pos_embed

    state["pos_embed"] = sincos_pos_embed(768, 14)  # fixed in the released encoder
    return state


def test_convmae_release_and_pretrain_checkpoint(tmp_path, convvit_b):
    released = {"model": dict(convvit_b)}  # convmae_base.pth: encoder only
    check_exact(save(tmp_path, "convmae_base.pth", released), convvit_b, expect_format="convmae",
                expect_arch="convvit_base")
    full = dict(convvit_b)  # the pretraining checkpoint.pth: decoder, mask token and fusion convs ride along
    full.update({"mask_token": torch.randn(1, 1, 512), "decoder_embed.weight": torch.randn(512, 768),
                 "decoder_pos_embed": torch.randn(1, 196, 512), "decoder_blocks.0.norm1.weight": torch.ones(512),
                 "decoder_pred.weight": torch.randn(768, 512),
                 "stage1_output_decode.weight": torch.randn(768, 256, 4, 4),
                 "stage2_output_decode.weight": torch.randn(768, 384, 2, 2)})
    ckpt = {"model": full, "optimizer": {}, "epoch": 1599, "scaler": {}, "args": argparse.Namespace(model="convmae")}
    _, report = check_exact(save(tmp_path, "checkpoint-1599.pth", ckpt), convvit_b, expect_format="convmae")
    assert report.dropped["stage1_output_decode.weight"] == "masked-image-modelling decoder"
    assert report.dropped["decoder_pred.weight"] == "masked-image-modelling decoder"
    assert report.count("matched") == len(convvit_b)


def test_convmae_finetuned_drops_head_and_refuses_missing_stage(tmp_path, convvit_b):
    finetuned = {k: v for k, v in convvit_b.items() if k != "norm.weight" and k != "norm.bias"}
    finetuned.update({"head.weight": torch.randn(1000, 768), "fc_norm.weight": torch.ones(768)})
    with pytest.raises(CheckpointError, match="uninitialised"):  # fine-tuning deletes `norm`: say so, don't guess
        load_backbone(save(tmp_path, "convmae_ft.pth", {"model": finetuned}))
    no_stage1 = {k: v for k, v in convvit_b.items() if not k.startswith("blocks1.")}
    with pytest.raises(CheckpointError, match="matches no known preset"):
        load_backbone(save(tmp_path, "convmae_cut.pth", {"model": no_stage1}))


def test_convvit_pos_embed_regrid_with_note(tmp_path, convvit_b):
    backbone, report = load_backbone(save(tmp_path, "convmae_base.pth", {"model": convvit_b}), img_size=64)
    assert backbone.trunk.pos_embed.shape == (1, 16, 768)
    assert any("sin-cos table recomputed 14x14 -> 4x4" in n for n in report.notes), report.notes
    from transfer.convvit import sincos_pos_embed

    assert torch.allclose(backbone.trunk.pos_embed, sincos_pos_embed(768, 4))
    assert backbone(torch.rand(1, 3, 64, 64)).shape == (1, 768)


def test_detectron2_pkl_round_trip_convert_then_reverse(tmp_path, r50):
    """bench's own detectron2 conversion (MoCo rules, used by the detectron2 engine) read back by the audit."""
    from transfer.detectron2_engine import write_pkl

    trunk = {k: v for k, v in r50.items() if not k.startswith("fc.")}
    path = write_pkl(trunk, tmp_path / "r50.pkl")
    check_exact(path, r50, expect_format="detectron2", expect_arch="resnet50")
