"""Published checkpoints as users have them: each file is built with its release's real save call, key names,
nesting, extras and serialisation (read from the repositories named in each test; commits in the README layout
table), from small models with the real key names. Every trunk tensor must load equal to its source, every other
tensor must be dropped with a reason, the artifact must hold trunk tensors only, and refusals must name the cause.
"""
import argparse
import functools
import os
import pickle
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from transfer.artifact import ArtifactError, BackboneArtifact, build_backbone, check_trunk_only, save_artifact
from transfer.loading import CheckpointError, load_backbone, read_state_dict, to_artifact

R50_WIDTH = 16  # slim ResNet-50: torchvision key names and depth, 1/4 of the channels


def _randomised(model):
    return {k: (torch.randn_like(v) if v.is_floating_point() else v.clone()) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    return _randomised(build_backbone("resnet50", width=R50_WIDTH))  # the trunk (fc is Identity)


@pytest.fixture(scope="module")
def vit():
    """timm ViT-Ti/16 at 32 px (a 2x2 grid): timm names, full width and depth, tiny position table; with head."""
    import timm

    torch.manual_seed(1)
    return _randomised(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10))


def _linear(prefix, n_in, n_out, bias=True):
    out = {f"{prefix}.weight": torch.randn(n_out, n_in)}
    if bias:
        out[f"{prefix}.bias"] = torch.randn(n_out)
    return out


def _bn1d(prefix, n, affine=True):
    out = {f"{prefix}.running_mean": torch.randn(n), f"{prefix}.running_var": torch.rand(n),
           f"{prefix}.num_batches_tracked": torch.tensor(7)}
    if affine:
        out[f"{prefix}.weight"], out[f"{prefix}.bias"] = torch.randn(n), torch.randn(n)
    return out


def _under(prefix, state, skip=("fc.", "head.")):
    return {prefix + k: v for k, v in state.items() if not k.startswith(skip)}


def assert_loads_exactly(path, source, fmt, key_prefix="", **kw):
    """Every trunk tensor equals source[key_prefix + name]; every other tensor of the weights entry is dropped
    with a reason; the artifact holds exactly the architecture's trunk tensors."""
    art, report = to_artifact(path, **kw)
    assert report.ok and report.format == fmt, report.summary()
    backbone, _ = load_backbone(path, **kw)
    for key, value in backbone.trunk.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, source[key_prefix + key]), key
    tensors, _ = read_state_dict(path, kw.get("state_key"))
    assert len(art.state_dict) + len(report.dropped) == len(tensors), report.summary()
    assert all(reason for reason in report.dropped.values())
    model_keys = {k for k in build_backbone(art.arch, **art.arch_kwargs).state_dict()}
    assert set(art.state_dict) <= model_keys
    assert {k for k in model_keys - set(art.state_dict) if not k.endswith("num_batches_tracked")} == set()
    return art, report


def _save(path, obj, zip_format=True):
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    return path


# ------------------------------------------------------------------------------------------------ 1. detectron2
def _moco_convert_to_detectron2(state, prefix):
    """facebookresearch/moco detection/convert-pretrain-to-detectron2.py (PixPro's copy and detectron2's
    convert-torchvision-to-d2.py use the same rules), verbatim: every key under the encoder prefix is renamed, the
    head included (`fc.0/fc.2`, or torchvision's `fc`, become `stem.fc*`)."""
    newmodel = {}
    for k, v in state.items():
        if not k.startswith(prefix):
            continue
        k = k.replace(prefix, "")
        if "layer" not in k:
            k = "stem." + k
        for t in [1, 2, 3, 4]:
            k = k.replace("layer{}".format(t), "res{}".format(t + 1))
        for t in [1, 2, 3]:
            k = k.replace("bn{}".format(t), "conv{}.norm".format(t))
        k = k.replace("downsample.0", "shortcut")
        k = k.replace("downsample.1", "shortcut.norm")
        newmodel[k] = v.numpy()
    return newmodel


@pytest.mark.parametrize("author,prefix,head", [("MOCO", "module.encoder_q.", ("fc.0", "fc.2")),
                                                ("PixPro", "module.encoder.", ("fc.0", "fc.2")),
                                                ("torchvision", "", ("fc",))])
def test_detectron2_converter_output_drops_the_head(tmp_path, r50, author, prefix, head):
    """MoCo's / PixPro's convert-pretrain-to-detectron2.py and detectron2's tools/convert-torchvision-to-d2.py share
    the renaming rules: the MLP head / classifier lands under `stem.fc*` and must be dropped with a reason."""
    dim = 512  # the slim trunk's feature width
    ckpt = {**_under(prefix, r50), **{k: v for i, name in enumerate(head)
                                      for k, v in _linear(prefix + name, dim if i == 0 else 64, 64).items()}}
    path = tmp_path / "model_d2.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": _moco_convert_to_detectron2(ckpt, prefix), "__author__": author,
                     "matching_heuristics": True}, f)
    art, report = assert_loads_exactly(path, r50, "detectron2")
    assert set(report.dropped) == {f"stem.{name}.{p}" for name in head for p in ("weight", "bias")}
    assert all("head (fc)" in r for r in report.dropped.values())
    assert not any(k.startswith("fc.") for k in art.state_dict)


def test_artifacts_hold_trunk_tensors_only(tmp_path, r50):
    trunk = {k: v for k, v in r50.items() if not k.endswith("num_batches_tracked")}
    art = BackboneArtifact("resnet50", {**trunk, "fc.0.weight": torch.randn(512, 512)},
                           arch_kwargs={"width": R50_WIDTH})
    with pytest.raises(ArtifactError, match=r"fc\.0\.weight"):
        save_artifact(tmp_path / "a.safetensors", art)
    art.state_dict = trunk
    check_trunk_only(art)
    art.state_dict = {**trunk, "layer1.0.conv1.weight": torch.randn(3, 3)}
    with pytest.raises(ArtifactError, match=r"layer1\.0\.conv1\.weight \(3, 3\)"):
        check_trunk_only(art)


def test_unmapped_trunk_keys_refuse_the_load(tmp_path, r50):
    """A trunk-prefixed key with no place in the architecture is no longer counted 'unexpected' and passed."""
    sd = {**_under("module.encoder_q.", r50), "module.encoder_q.layer5.0.conv1.weight": torch.randn(4, 4)}
    path = _save(tmp_path / "odd.pth.tar", {"state_dict": sd})
    with pytest.raises(CheckpointError, match=r"1 tensors that are no part of a resnet50 trunk"):
        to_artifact(path)
    art, report = to_artifact(path, allow_partial=True)
    assert "layer5.0.conv1.weight" not in art.state_dict and "layer5.0.conv1.weight" in report.dropped


# ------------------------------------------------------------------------------------------------ 2. pickled code
def _register_module(monkeypatch, name, **objects):
    """Make `objects` importable as `name` (with its parent packages) so that pickle stores them by reference,
    as the training script did; the loader must never import them."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    for attr, obj in objects.items():
        obj.__module__, obj.__qualname__ = name, attr
        setattr(sys.modules[name], attr, obj)


def _forget_modules(monkeypatch, name):
    for key in [k for k in sys.modules if k == name.split(".")[0] or k.startswith(name.split(".")[0] + ".")]:
        monkeypatch.delitem(sys.modules, key)


@pytest.mark.parametrize("zip_format", [True, False])
def test_vicreg_training_checkpoint_with_lars_state(tmp_path, monkeypatch, r50, zip_format):
    """facebookresearch/vicreg main_vicreg.py: state = dict(epoch, model=DDP(VICReg).state_dict(),
    optimizer=LARS(..., weight_decay_filter=exclude_bias_and_norm, lars_adaptation_filter=...).state_dict());
    torch.save(state, exp_dir / "model.pth"); the filter is a function of the training script (__main__)."""
    def exclude_bias_and_norm(p):
        return p.ndim == 1

    monkeypatch.setattr(sys.modules["__main__"], "exclude_bias_and_norm", exclude_bias_and_norm, raising=False)
    exclude_bias_and_norm.__module__, exclude_bias_and_norm.__qualname__ = "__main__", "exclude_bias_and_norm"
    model = {**_under("module.backbone.", r50), **_linear("module.projector.0", 512, 64), **_bn1d(
        "module.projector.1", 64), **_linear("module.projector.3", 64, 64, bias=False)}
    params = [torch.nn.Parameter(v.clone()) for k, v in model.items() if v.is_floating_point()]
    lars = torch.optim.SGD(params, lr=0)  # LARS keeps SGD's state_dict(); its param group holds the filters
    lars.param_groups[0].update(eta=0.001, weight_decay_filter=exclude_bias_and_norm,
                                lars_adaptation_filter=exclude_bias_and_norm)
    lars.state[params[0]]["mu"] = torch.zeros_like(params[0])
    path = _save(tmp_path / "model.pth", dict(epoch=1000, model=model, optimizer=lars.state_dict()), zip_format)
    monkeypatch.delattr(sys.modules["__main__"], "exclude_bias_and_norm")
    _, report = assert_loads_exactly(path, model, "module-backbone-prefix", "module.backbone.")
    assert any("'optimizer'" in n and "__main__.exclude_bias_and_norm" in n for n in report.notes), report.notes


def test_solo_learn_simsiam_checkpoint_with_partial_in_scheduler(tmp_path, monkeypatch, r50):
    """vturrisi/solo-learn solo/methods/base.py configure_optimizers: the predictor's static LR replaces the
    scheduler's get_lr by functools.partial(static_lr, get_lr=scheduler.get_lr, ...); Lightning saves
    state_dict, optimizer_states and lr_schedulers=[scheduler.state_dict()], which pickles that partial, the
    bound method and through it the scheduler and LARS objects."""
    class LARS(torch.optim.SGD):
        pass

    class LinearWarmupCosineAnnealingLR(torch.optim.lr_scheduler.LRScheduler):
        def get_lr(self):
            return [group["lr"] for group in self.optimizer.param_groups]

    def static_lr(get_lr, param_group_indexes, lrs_to_replace):
        lrs = get_lr()
        for idx, lr in zip(param_group_indexes, lrs_to_replace):
            lrs[idx] = lr
        return lrs

    _register_module(monkeypatch, "solo.utils.lars", LARS=LARS)
    _register_module(monkeypatch, "solo.utils.lr_scheduler", LinearWarmupCosineAnnealingLR=LinearWarmupCosineAnnealingLR)
    _register_module(monkeypatch, "solo.utils.misc", static_lr=static_lr)
    state_dict = {**_under("backbone.", r50), **_linear("projector.0", 512, 512, bias=False),
                  **_bn1d("projector.1", 512), **_linear("projector.3", 512, 512, bias=False),
                  **_bn1d("projector.4", 512), **_linear("projector.6", 512, 128), **_bn1d("projector.7", 128, False),
                  **_linear("predictor.0", 128, 32, bias=False), **_bn1d("predictor.1", 32),
                  **_linear("predictor.3", 32, 128), **_linear("classifier", 512, 10)}
    groups = [{"name": n, "params": [torch.nn.Parameter(v.clone()) for k, v in state_dict.items()
                                     if k.startswith(n) and v.is_floating_point()]}
              for n in ("backbone", "projector", "predictor", "classifier")]
    optimizer = LARS(groups, lr=0.5, momentum=0.9)
    scheduler = LinearWarmupCosineAnnealingLR(optimizer)
    scheduler.get_lr = functools.partial(static_lr, get_lr=scheduler.get_lr, param_group_indexes=[2],
                                         lrs_to_replace=[0.5])
    ckpt = {"epoch": 400, "global_step": 500400, "pytorch-lightning_version": "2.0.2", "state_dict": state_dict,
            "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 400}}}}, "callbacks": {},
            "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [scheduler.state_dict()],
            "hparams_name": "kwargs", "hyper_parameters": {"cfg": {"method": "simsiam"}}}
    path = _save(tmp_path / "simsiam-imagenet-3hf4a8tb-ep=399.ckpt", ckpt)
    _forget_modules(monkeypatch, "solo.utils")
    _, report = assert_loads_exactly(path, state_dict, "backbone-prefix", "backbone.")
    note = next(n for n in report.notes if "'lr_schedulers'" in n)
    assert "functools.partial" in note and "solo.utils.misc.static_lr" in note and "builtins.getattr" in note
    assert "solo" not in sys.modules


def test_forbidden_global_inside_the_weights_is_refused(tmp_path, monkeypatch, r50):
    """A stand-in may sit only in entries bench drops: a pickled function among the weights refuses the file."""
    def hook(module, state_dict, prefix, *args):
        return None

    _register_module(monkeypatch, "trainer.hooks", hook=hook)
    sd = {**_under("backbone.", r50), "backbone._extra_hook": hook}
    path = _save(tmp_path / "ckpt.pth", {"state_dict": sd, "epoch": 1})
    with pytest.raises(CheckpointError, match=r"entry 'state_dict', which holds the weights, holds pickled "
                                              r"objects of trainer\.hooks\.hook"):
        to_artifact(path)


class _WritesFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.mark.parametrize("where", ["weights", "optimizer"])
@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_never_runs(tmp_path, r50, where, zip_format):
    marker = tmp_path / "written-by-pickle"
    sd = _under("module.encoder_q.", r50)
    ckpt = {"state_dict": {**sd, "module.queue": _WritesFile(marker)} if where == "weights" else sd,
            "optimizer": {"param_groups": [{"lr": _WritesFile(marker)}]}, "epoch": 200}
    path = _save(tmp_path / "moco_v2_200ep_pretrain.pth.tar", ckpt, zip_format)
    if where == "weights":
        with pytest.raises(CheckpointError, match=r"builtins\.eval"):
            to_artifact(path)
    else:
        _, report = to_artifact(path)
        assert any("'optimizer'" in n and "builtins.eval" in n for n in report.notes)
    assert not marker.exists()


def test_moco_v2_legacy_pth_tar(tmp_path, r50):
    """MoCo v2's moco_v2_800ep_pretrain.pth.tar was written by torch < 1.6 (legacy, non-zip): main_moco.py
    save_checkpoint({'epoch', 'arch', 'state_dict', 'optimizer'}) with encoder_q/encoder_k/queue/queue_ptr."""
    sd = {**_under("module.encoder_q.", r50), **_linear("module.encoder_q.fc.0", 512, 512),
          **_linear("module.encoder_q.fc.2", 512, 128), **_under("module.encoder_k.", r50),
          "module.queue": torch.randn(128, 65536), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    ckpt = {"epoch": 800, "arch": "resnet50", "state_dict": sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": [0, 1]}]}}
    assert_loads_exactly(_save(tmp_path / "moco_v2_800ep_pretrain.pth.tar", ckpt, zip_format=False), sd, "moco",
                         "module.encoder_q.")


# ------------------------------------------------------------------------------------------------ 4. bad files
@pytest.mark.parametrize("zip_format", [True, False])
def test_truncated_checkpoint_names_the_cause(tmp_path, r50, zip_format):
    path = _save(tmp_path / "moco_v2_800ep_pretrain.pth.tar", {"state_dict": _under("module.encoder_q.", r50),
                                                               "epoch": 800}, zip_format)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"moco_v2_800ep_pretrain\.pth\.tar: truncated file") as err:
        to_artifact(path)
    assert "no tensor dictionary" not in str(err.value)


def test_malicious_legacy_pth_tar_names_the_global(tmp_path, r50):
    marker = tmp_path / "written-by-pickle"
    path = _save(tmp_path / "checkpoint.pth.tar", {"state_dict": {"conv1.weight": _WritesFile(marker)}}, False)
    with pytest.raises(CheckpointError, match=r"refused: .* pickled objects of builtins\.eval") as err:
        to_artifact(path)
    assert "no tensor dictionary" not in str(err.value) and not marker.exists()


# ------------------------------------------------------------------------------------------------ 3. MMPretrain ViT
def _timm_to_mmpretrain(state):
    """open-mmlab/mmpretrain tools/model_converters/deit3_to_mmpretrain.py convert_deit3 (timm -> mmpretrain):
    blocks->layers, norm1/2->ln1/2, mlp.fc1->ffn.layers.0.0, mlp.fc2->ffn.layers.1, proj->projection, final
    norm->ln1, `backbone.` prefix; heads dropped here (the MAE/MoCo v3 pretraining models have none)."""
    out = {}
    for k, v in state.items():
        if k.startswith("head"):
            continue
        if k.startswith("patch_embed"):
            new_k = k.replace("proj.", "projection.")
        elif k.startswith("blocks"):
            new_k = k.replace("blocks.", "layers.")
            new_k = (new_k.replace("norm1", "ln1").replace("norm2", "ln2").replace("mlp.fc1", "ffn.layers.0.0")
                     .replace("mlp.fc2", "ffn.layers.1"))
        elif k.startswith("norm"):
            new_k = k.replace("norm", "ln1")
        else:
            new_k = k
        out["backbone." + new_k] = v
    return out


def _mm_transformer_layer(prefix, dim, hidden):
    out = {}
    for ln in ("ln1", "ln2"):
        out[f"{prefix}.{ln}.weight"], out[f"{prefix}.{ln}.bias"] = torch.randn(dim), torch.randn(dim)
    out.update({**_linear(f"{prefix}.attn.qkv", dim, 3 * dim), **_linear(f"{prefix}.attn.proj", dim, dim),
                **_linear(f"{prefix}.ffn.layers.0.0", dim, hidden), **_linear(f"{prefix}.ffn.layers.1", hidden, dim)})
    return out


def _history_buffer():
    from mmengine.logging import HistoryBuffer

    buffer = HistoryBuffer()
    buffer.update(0.5)
    return buffer


def test_mmpretrain_mae_training_checkpoint(tmp_path, vit):
    """configs/mae/mae_vit-base-p16_8xb512-amp-coslr-1600e_in1k.py (MAE: MAEViT backbone, MAEPretrainDecoder
    neck); mmengine Runner.save_checkpoint: meta, state_dict, message_hub (HistoryBuffer objects), optimizer,
    param_schedulers."""
    state_dict = {**_timm_to_mmpretrain(vit), **_linear("neck.decoder_embed", 192, 128),
                  "neck.mask_token": torch.randn(1, 1, 128), "neck.decoder_pos_embed": torch.randn(1, 5, 128),
                  **_mm_transformer_layer("neck.decoder_blocks.0", 128, 512), "neck.ln1.weight": torch.randn(128),
                  "neck.ln1.bias": torch.randn(128), **_linear("neck.decoder_pred", 128, 768)}
    ckpt = {"meta": {"epoch": 1600, "iter": 500000, "mmengine_version": "0.7.3", "seed": 0},
            "state_dict": state_dict,
            "message_hub": {"log_scalars": {"train/loss": _history_buffer()}, "runtime_info": {"epoch": 1600},
                            "resumed_keys": {"epoch": True}},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}], "loss_scaler": {"scale": 1024.0}},
            "param_schedulers": [{"start_factor": 1e-4, "by_epoch": True}]}
    path = _save(tmp_path / "epoch_1600.pth", ckpt)
    art, report = assert_loads_exactly(path, vit, "mmpretrain-vit")
    assert art.arch == "vit_tiny_patch16" and art.arch_kwargs == {"img_size": 32}
    assert report.dropped["neck.decoder_pred.weight"] == "masked-image-modelling decoder"
    assert report.dropped["neck.ln1.weight"] == "SSL projection/prediction head"
    assert any("'message_hub'" in n and "HistoryBuffer" in n for n in report.notes), report.notes
    # the published file (tools/model_converters/publish_model.py pops optimizer/schedulers/message_hub)
    published = {"meta": ckpt["meta"], "state_dict": state_dict}
    assert_loads_exactly(_save(tmp_path / "mae_vit-base-p16_8xb512-coslr-1600e_in1k_20220825-f7569ca2.pth",
                               published), vit, "mmpretrain-vit")


def test_mmpretrain_mocov3_vit(tmp_path, vit):
    """configs/mocov3/mocov3_vit-small-p16_16xb256-amp-coslr-300e_in1k.py: MoCoV3ViT backbone, NonLinearNeck,
    MoCoV3Head predictor and momentum_encoder = CosineEMA(nn.Sequential(backbone, neck)) (module.0/1, steps)."""
    backbone = _timm_to_mmpretrain(vit)
    neck = {**_linear("neck.fc0", 192, 64, bias=False), **_bn1d("neck.bn0", 64),
            **_linear("neck.fc1", 64, 32, bias=False), **_bn1d("neck.bn1", 32, affine=False)}
    state_dict = {**backbone, **neck, **_linear("head.predictor.fc0", 32, 64, bias=False),
                  **{"momentum_encoder.module.0." + k[len("backbone."):]: v + 1 for k, v in backbone.items()},
                  **{"momentum_encoder.module.1." + k[len("neck."):]: v for k, v in neck.items()},
                  "momentum_encoder.steps": torch.tensor(300)}
    _, report = assert_loads_exactly(_save(tmp_path / "mocov3_vit-small-p16.pth", {"meta": {}, "state_dict":
                                                                                    state_dict}), vit,
                                     "mmpretrain-vit")
    assert report.dropped["momentum_encoder.module.0.ln1.weight"] == "momentum / target encoder"


def _fixture_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_mmpretrain_vit", Path(__file__).parent / "fixtures" /
                                                  "make_mmpretrain_vit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model", ["mae", "mocov3"])
def test_mmpretrain_vit_tokens_equal_mmpretrains(tmp_path, model):
    """Golden fixture from MMPretrain's own MAE / MoCo v3 models (tests/fixtures/make_mmpretrain_vit.py): the file
    holds the real full state-dict names (backbone, neck, head, momentum encoder); bench's timm ViT, loaded from it,
    computes MMPretrain's backbone tokens."""
    make = _fixture_module()
    fixture = torch.load(Path(__file__).parent / "fixtures" / "mmpretrain_vit.pt")[model]
    state_dict = make.seeded_state(fixture["keys"])
    path = _save(tmp_path / f"{model}_vit-tiny-p16_epoch_300.pth", {"meta": {"epoch": 300}, "state_dict":
                                                                    state_dict})
    backbone, report = load_backbone(path)
    assert report.ok and report.format == "mmpretrain-vit" and backbone.arch == "vit_tiny_patch16"
    assert report.count("matched") + len(report.dropped) == len(state_dict)
    assert not any(k.startswith("backbone.") for k in report.dropped)
    with torch.no_grad():
        tokens = backbone.trunk.eval().forward_features(make.seeded_images())
    torch.testing.assert_close(tokens, fixture["tokens"], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("mm_key,timm_key", [("backbone.layers.0.attn.gamma1.weight", "blocks.0.ls1.gamma"),
                                             ("backbone.pre_norm.weight", "norm_pre.weight")])
def test_mmpretrain_vit_extras_refused_with_the_keys(tmp_path, vit, mm_key, timm_key):
    """DeiT III / BEiT-style layer scale (attn.gamma1.weight) and CLIP-style pre_norm have no place in bench's
    timm ViT: refused, named, never dropped silently."""
    sd = _timm_to_mmpretrain(vit)
    sd[mm_key] = torch.ones(192)
    with pytest.raises(CheckpointError, match=re.escape(timm_key)):
        to_artifact(_save(tmp_path / "deit3.pth", {"state_dict": sd}))


# ------------------------------------------------------------------------------------------------ 5. other releases
def test_timm_hub_safetensors(tmp_path, vit):
    """timm's Hugging Face files: model.safetensors with timm names, head included, metadata {'format': 'pt'}."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in vit.items()}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _, report = assert_loads_exactly(tmp_path / "model.safetensors", vit, "torchvision")
    assert set(report.dropped) == {"head.weight", "head.bias"}


def test_torchvision_vit_maps_to_timm_with_equal_features(tmp_path):
    """torchvision.models.vit_b_16 files (vit_b_16-c867db91.pth): conv_proj, class_token, encoder.pos_embedding,
    encoder.layers.encoder_layer_N.{ln_1, self_attention.in_proj_*, out_proj, ln_2, mlp.0/3}, encoder.ln, heads.
    Parity: the mapped timm model computes the torchvision model's features."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(5)
    tv = VisionTransformer(image_size=32, patch_size=16, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768,
                           num_classes=10)
    state = _randomised(tv)
    tv.load_state_dict(state)
    path = _save(tmp_path / "vit_b_16-c867db91.pth", state)
    backbone, report = load_backbone(path)
    assert report.ok and report.format == "torchvision-vit" and backbone.arch == "vit_tiny_patch16"
    assert set(report.dropped) == {"heads.head.weight", "heads.head.bias"}
    assert backbone.trunk.blocks[3].attn.qkv.weight.equal(state["encoder.layers.encoder_layer_3.self_attention."
                                                                "in_proj_weight"])
    tv.heads = torch.nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone.trunk.eval()(x), tv.eval()(x), atol=1e-5, rtol=1e-5)


def test_deit_release(tmp_path, vit):
    """facebookresearch/deit main.py: torch.save({'model': model_without_ddp.state_dict(), ...}); the released
    deit_*_patch16_224-*.pth keep only `model` (timm names, head included)."""
    assert_loads_exactly(_save(tmp_path / "deit_tiny_patch16_224-a1311bcf.pth", {"model": vit}), vit, "torchvision")


def test_ibot_release_and_full_checkpoint(tmp_path, vit):
    """bytedance/ibot: checkpoint_teacher.pth (extract_backbone_weights.py: {'state_dict': backbone keys with
    `backbone.` stripped}) and main_ibot.py's checkpoint.pth (student DDP / teacher, optimizer, epoch, args,
    ibot_loss with the centers, fp16_scaler)."""
    trunk = {k: v for k, v in vit.items() if not k.startswith("head.")}
    assert_loads_exactly(_save(tmp_path / "checkpoint_teacher.pth", {"state_dict": trunk}), vit, "torchvision")
    head = {**_linear("head.mlp.0", 192, 64), "head.last_layer.weight_g": torch.ones(128, 1),
            "head.last_layer.weight_v": torch.randn(128, 64), "head.last_layer2.weight_g": torch.ones(128, 1),
            "head.last_layer2.weight_v": torch.randn(128, 64)}
    teacher = {**_under("backbone.", vit), **head}
    student = {"module." + k: v + 1 for k, v in teacher.items()}
    ckpt = {"student": student, "teacher": teacher, "optimizer": {"state": {}, "param_groups": []}, "epoch": 800,
            "args": argparse.Namespace(arch="vit_small", patch_size=16),
            "ibot_loss": {"center": torch.zeros(1, 8192), "center2": torch.zeros(1, 1, 8192)},
            "fp16_scaler": {"scale": 65536.0}}
    _, report = assert_loads_exactly(_save(tmp_path / "checkpoint.pth", ckpt), vit, "backbone-prefix",
                                     "")
    assert any("'teacher'" in n for n in report.notes)


def test_msn_checkpoint_prefers_target_encoder(tmp_path, vit):
    """facebookresearch/msn src/msn_train.py save_dict: encoder / target_encoder (DDP: `module.`, projection head
    `module.fc.fc1..fc3`), opt, prototypes, epoch, loss, batch_size, world_size, lr, temperature; linear_eval.py
    reads `target_encoder`."""
    fc = {**_linear("fc.fc1", 192, 256), **_linear("fc.fc2", 256, 256), **_linear("fc.fc3", 256, 64)}
    trunk = {k: v for k, v in vit.items() if not k.startswith("head.")}
    target = {"module." + k: v for k, v in {**trunk, **fc}.items()}
    ckpt = {"encoder": {k: v + 1 for k, v in target.items()}, "opt": {"state": {}, "param_groups": []},
            "prototypes": torch.randn(1024, 64), "target_encoder": target, "epoch": 300, "loss": 1.5,
            "batch_size": 64, "world_size": 16, "lr": 0.001, "temperature": 0.1}
    _, report = assert_loads_exactly(_save(tmp_path / "vits16_800ep.pth.tar", ckpt), vit, "ddp-module")
    assert any("'target_encoder'" in n for n in report.notes)


def test_densecl_release_and_training_checkpoint(tmp_path, r50):
    """WXinlong/DenseCL: tools/extract_backbone_weights.py writes {'state_dict': backbone keys, 'author':
    'DenseCL'} (densecl_r50_imagenet_200ep.pth); the mmcv training checkpoint holds backbone (= encoder_q.0),
    encoder_q/encoder_k with necks and the two queues."""
    assert_loads_exactly(_save(tmp_path / "densecl_r50_imagenet_200ep.pth", {"state_dict": dict(r50), "author":
                                                                             "DenseCL"}), r50, "torchvision")
    neck = {**_linear("1.mlp.0", 512, 512), **_linear("1.mlp.2", 512, 128), **_linear("1.mlp2.0", 512, 512, False)}
    state_dict = {**_under("backbone.", r50), **_under("encoder_q.0.", r50), **_under("encoder_k.0.", r50),
                  **{"encoder_q." + k: v for k, v in neck.items()}, **{"encoder_k." + k: v for k, v in neck.items()},
                  "queue": torch.randn(128, 65536), "queue_ptr": torch.zeros(1, dtype=torch.long),
                  "queue2": torch.randn(128, 65536), "queue2_ptr": torch.zeros(1, dtype=torch.long)}
    ckpt = {"meta": {"mmcv_version": "0.4.3", "time": "Tue Dec 1 2020", "epoch": 200, "iter": 1000},
            "state_dict": state_dict, "optimizer": {"state": {}, "param_groups": []}}
    _, report = assert_loads_exactly(_save(tmp_path / "epoch_200.pth", ckpt), state_dict, "backbone-prefix",
                                     "backbone.")
    assert report.dropped["queue2"] == "negative queue" and report.dropped["encoder_k.0.conv1.weight"]


def test_pixpro_checkpoint(tmp_path, r50):
    """zdaxie/PixPro main_pretrain.py save_checkpoint: {'opt': args, 'model': DDP(PixPro).state_dict(),
    'optimizer', 'scheduler', 'epoch'}; publish_model.py keeps `model` only. PixPro registers encoder, encoder_k,
    projector(_k), value_transform, projector_instance(_k) and predictor."""
    proj = {**_linear("linear1", 512, 256), **_bn1d("bn1", 256), **_linear("linear2", 256, 64)}
    model = {**_under("module.encoder.", r50), **_under("module.encoder_k.", r50),
             **{f"module.{part}.{k}": v for part in ("projector", "projector_k", "projector_instance",
                                                       "projector_instance_k", "predictor", "value_transform")
                for k, v in proj.items()}}
    ckpt = {"opt": argparse.Namespace(arch="resnet50", pixpro_p=2.0), "model": model,
            "optimizer": {"state": {}, "param_groups": []},
            "scheduler": {"last_epoch": 400, "after_scheduler": {"T_max": 390}}, "epoch": 400}
    _, report = assert_loads_exactly(_save(tmp_path / "ckpt_epoch_400.pth", ckpt), model, "module-encoder",
                                     "module.encoder.")
    assert report.dropped["module.value_transform.linear1.weight"].startswith("PixPro")
    assert report.dropped["module.encoder_k.conv1.weight"].startswith("momentum")
    assert_loads_exactly(_save(tmp_path / "pixpro_base_r50_400ep_md5_919c6612.pth", {"model": model}), model,
                         "module-encoder", "module.encoder.")


@pytest.mark.parametrize("zip_format", [True, False])
def test_simsiam_official_checkpoint(tmp_path, r50, zip_format):
    """facebookresearch/simsiam main_simsiam.py save_checkpoint({'epoch', 'arch', 'state_dict', 'optimizer'},
    filename='checkpoint_{:04d}.pth.tar'); builder.py: encoder.fc = 3-layer projector (fc.0..fc.7, fc.7 BN without
    affine), predictor.0/1/3."""
    sd = {**_under("module.encoder.", r50), **_linear("module.encoder.fc.0", 512, 512, bias=False),
          **_bn1d("module.encoder.fc.1", 512), **_linear("module.encoder.fc.3", 512, 512, bias=False),
          **_bn1d("module.encoder.fc.4", 512), **_linear("module.encoder.fc.6", 512, 128),
          **_bn1d("module.encoder.fc.7", 128, affine=False), **_linear("module.predictor.0", 128, 32, bias=False),
          **_bn1d("module.predictor.1", 32), **_linear("module.predictor.3", 32, 128)}
    ckpt = {"epoch": 100, "arch": "resnet50", "state_dict": sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.05, "fix_lr": True}]}}
    _, report = assert_loads_exactly(_save(tmp_path / "checkpoint_0099.pth.tar", ckpt, zip_format), sd,
                                     "module-encoder", "module.encoder.")
    assert report.dropped["module.encoder.fc.7.running_var"] == "classifier / projection head (fc)"


def test_byol_jax_converted_release(tmp_path, r50):
    """chigur/byol-convert convert.py (deepmind-byol pretrain_res50x1.pkl -> pretrain_res50x1.pth.tar): a bare
    torchvision state dict built from the Haiku params (conv weights permuted, BN params squeezed, the classifier
    as fc, no num_batches_tracked), torch.save(state_dict, path)."""
    state = {k: v for k, v in r50.items() if not k.endswith("num_batches_tracked")}
    state = {k: (v.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1) if v.ndim == 4 else v)
             for k, v in state.items()}  # HWIO -> OIHW, as the converter does: non-contiguous views
    state.update(_linear("fc", 512, 1000))
    _, report = assert_loads_exactly(_save(tmp_path / "pretrain_res50x1.pth.tar", state), state, "torchvision")
    assert set(report.dropped) == {"fc.weight", "fc.bias"}


def test_esvit_swin_refused_with_the_cause(tmp_path):
    """microsoft/esvit main_esvit.py saves DINO's {student, teacher, optimizer, epoch, args, dino_loss}; its
    released models are Swin / CvT / ViL trunks (models/swin_transformer.py), which bench has no architecture for:
    refused, saying why, never loaded partially."""
    teacher = {"backbone.patch_embed.proj.weight": torch.randn(96, 3, 4, 4), "backbone.patch_embed.norm.weight":
               torch.ones(96), "backbone.layers.0.blocks.0.norm1.weight": torch.ones(96),
               "backbone.layers.0.blocks.0.attn.relative_position_bias_table": torch.randn(169, 3),
               "backbone.norm.weight": torch.ones(768), **_linear("head.mlp.0", 768, 64)}
    path = _save(tmp_path / "checkpoint_best.pth", {"teacher": teacher, "student": teacher, "epoch": 300,
                                                    "args": argparse.Namespace(arch="swin_tiny")})
    with pytest.raises(CheckpointError, match=r"ViT with width 96 and patch 4 matches no known timm ViT"):
        to_artifact(path)


def test_data2vec_beit_style_vit_refused_naming_the_keys(tmp_path):
    """data2vec vision (BEiT code; key names from transformers' convert_data2vec_vision_original_pytorch_checkpoint
    _to_pytorch.py): shared relative position bias, layer scale gamma_1/2, q_bias/v_bias instead of a qkv bias and
    no absolute pos_embed. No bench ViT has these: refused with the keys named."""
    model = {"cls_token": torch.randn(1, 1, 192), "mask_token": torch.randn(1, 1, 192),
             "patch_embed.proj.weight": torch.randn(192, 3, 16, 16), "patch_embed.proj.bias": torch.zeros(192),
             "rel_pos_bias.relative_position_bias_table": torch.randn(732, 3),
             "blocks.0.gamma_1": torch.ones(192), "blocks.0.gamma_2": torch.ones(192),
             "blocks.0.attn.qkv.weight": torch.randn(576, 192), "blocks.0.attn.q_bias": torch.zeros(192),
             "blocks.0.attn.v_bias": torch.zeros(192), "norm.weight": torch.ones(192), "norm.bias": torch.zeros(192)}
    with pytest.raises(CheckpointError) as err:
        to_artifact(_save(tmp_path / "data2vec_vision_base_pretrained.pt", {"model": model}))
    for key in ("rel_pos_bias.relative_position_bias_table", "blocks.0.gamma_1", "blocks.0.attn.q_bias",
                "pos_embed"):
        assert key in str(err.value)
