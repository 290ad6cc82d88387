import io

import numpy as np
import pytest
import torch
from PIL import Image

from models import BadImageError, decode_image, load_image_file
from models.images import to_tensor
from tests.models.png_files import png_file


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A syntactically valid PNG that claims width×height pixels but carries almost no data."""
    return png_file(width, height, bit_depth=8, colour_type=0, rows=b"\0" * 64)


def test_rgb_png_round_trips():
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    decoded = decode_image(png_bytes(image), name="ok.png")
    assert decoded.mode == "RGB" and decoded.size == (40, 30)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "1"])
def test_other_modes_become_rgb(mode):
    image = Image.new(mode, (16, 12))
    decoded = decode_image(png_bytes(image), name=f"{mode}.png")
    assert decoded.mode == "RGB" and decoded.size == (16, 12)


def test_sixteen_bit_grayscale_keeps_its_contrast():
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    image = Image.fromarray(ramp)
    assert image.mode.startswith("I;16")
    decoded = np.asarray(decode_image(png_bytes(image), name="16bit.png"))
    assert decoded[..., 0].min() == 0 and decoded[..., 0].max() == 255


def test_zero_bytes_is_a_bad_image():
    with pytest.raises(BadImageError, match="empty"):
        decode_image(b"", name="empty.png")


def test_not_an_image():
    with pytest.raises(BadImageError, match="not a recognised image format") as info:
        decode_image(b"%PDF-1.4 this is not an image", name="doc.pdf")
    assert info.value.name == "doc.pdf"


def test_truncated_png_is_reported_not_half_decoded():
    data = png_bytes(Image.effect_noise((256, 256), 60).convert("RGB"))
    with pytest.raises(BadImageError, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2], name="cut.png")


def test_truncated_jpeg(tmp_path):
    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 60).convert("RGB").save(buffer, format="JPEG")
    with pytest.raises(BadImageError):
        decode_image(buffer.getvalue()[:2000], name="cut.jpg")


def test_huge_image_is_refused_before_decoding():
    with pytest.raises(BadImageError, match="exceeds"):
        decode_image(huge_png_header(100_000, 100_000), name="bomb.png", max_pixels=64_000_000)


def test_moderately_huge_image_hits_our_own_limit():
    with pytest.raises(BadImageError, match="exceeds the limit of 1000000"):
        decode_image(huge_png_header(5_000, 5_000), name="big.png", max_pixels=1_000_000)


def test_pixel_limit_is_configurable():
    data = png_bytes(Image.new("RGB", (100, 100)))
    with pytest.raises(BadImageError, match="10000 pixels exceeds the limit of 9999"):
        decode_image(data, name="x.png", max_pixels=9_999)


def test_missing_file_is_a_bad_image(tmp_path):
    with pytest.raises(BadImageError, match="cannot be read"):
        load_image_file(tmp_path / "nope.png")


def test_to_tensor_shape_and_normalisation():
    tensor = to_tensor(Image.new("RGB", (50, 70), (255, 0, 128)), image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    assert torch.allclose(tensor[0], torch.ones(32, 32)) and torch.allclose(tensor[1], -torch.ones(32, 32))


def test_to_batch_normalises_exactly_as_the_float_formula() -> None:
    """The fast path (channels first on uint8, in-place float ops) gives the bits of the plain formula
    ``(x / (255 σ)) - μ / σ`` on the strided float view, so scores do not move by a last bit."""
    import numpy as np
    import torch
    from PIL import Image

    from models.images import IMAGENET_MEAN, IMAGENET_STD, to_batch

    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    batch = to_batch(images, image_size=64)
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2).float()
    scale = torch.tensor([1.0 / (255.0 * s) for s in IMAGENET_STD]).view(1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]).view(1, 3, 1, 1)
    assert batch.is_contiguous() and batch.dtype == torch.float32
    assert torch.equal(batch, pixels * scale - shift)


def _big_jpeg(side: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(5)
    coarse = Image.fromarray(rng.integers(0, 256, (side // 32, side // 32, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    coarse.resize((side, side), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_a_large_jpeg_is_decoded_at_a_quarter_scale_and_looks_like_the_full_decode() -> None:
    """2048² → 224: the decoder's 1/4 scale (512², still twice the input), not 1/2 as before; the model
    input stays within a few levels of resizing the full decode."""
    import io

    import numpy as np
    from PIL import Image

    from models.images import load_pixels, resize_for_model

    data = _big_jpeg(2048)
    assert load_pixels(data, size=224).size == (512, 512)
    assert load_pixels(data, size=500).size == (1024, 1024)  # 1/4 would leave less than twice 500
    assert load_pixels(data, size=600).size == (2048, 2048)  # even 1/2 would
    fast = np.asarray(decode_image(data, size=224), dtype=float)
    with Image.open(io.BytesIO(data)) as full:
        reference = np.asarray(resize_for_model(full.convert("RGB"), 224), dtype=float)
    assert np.abs(fast - reference).mean() < 0.5
    assert np.abs(fast - reference).max() <= 8


def test_training_features_of_a_large_jpeg_are_those_the_worker_scores(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Training decodes at the model's input size too, so a large JPEG gives the model the very pixels
    the worker will score (no train/serve difference from the decoder's reduced scale)."""
    import torch

    from models import PatchCoreConfig
    from models.features import PatchFeatureExtractor
    from models.training import extract_features

    config = PatchCoreConfig(batch_size=2)
    extractor = PatchFeatureExtractor(config, device="cpu")
    data = _big_jpeg(2048)
    path = tmp_path / "big.jpg"
    path.write_bytes(data)
    features = extract_features(["big"], [path], config, extractor=extractor)
    served = extractor.embed([decode_image(data, size=extractor.input_size)])
    expected = served.reshape(1, -1, served.shape[-1]).half().numpy()
    assert torch.equal(torch.from_numpy(features.features), torch.from_numpy(expected))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh runs it there)")
def test_a_gpu_batch_travels_as_uint8_and_is_bit_identical_to_the_cpu_batch() -> None:
    """The GPU normalises what arrives as uint8 (a quarter of the bytes, from pinned memory): the same two
    correctly rounded float operations, so scores do not depend on where the batch was normalised."""
    import numpy as np
    from PIL import Image

    from models.images import to_batch

    rng = np.random.default_rng(4)
    images = [Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)) for _ in range(5)]
    on_cpu = to_batch(images, image_size=64)
    on_gpu = to_batch(images, image_size=64, device="cuda")
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
    assert torch.equal(on_gpu.cpu(), on_cpu)
