"""The one eval transform: agreement with torchvision, and decoding of every input we promise to accept."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms as T

from tuneserve.models.architectures import get_architecture
from tuneserve.models.preprocessing import (ImageDecodeError, Preprocessing, decode, eval_transform, load_image, preprocess,
                                            preprocess_pixels)
from tuneserve.models.samples import sample_photos
from support import encode


def torchvision_eval(pp: Preprocessing) -> T.Compose:
    return T.Compose([
        T.Resize(pp.resize_size, interpolation=T.InterpolationMode(pp.interpolation)),
        T.CenterCrop(pp.input_size),
        T.ToTensor(),
        T.Normalize(pp.mean, pp.std),
    ])


def real_photos(hymenoptera):
    return sample_photos() + sorted((hymenoptera / "val" / "bees").glob("*.jpg"))[:6]


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet50", "efficientnet_b0", "convnext_tiny"])
def test_matches_torchvision_eval_transform(arch, hymenoptera):
    pp = get_architecture(arch).preprocessing
    reference = torchvision_eval(pp)
    photos = real_photos(hymenoptera)
    assert len(photos) >= 8
    for path in photos:
        img = load_image(path)
        ours = eval_transform(img, pp)
        theirs = reference(img).numpy()
        assert ours.shape == theirs.shape == (3, pp.input_size, pp.input_size)
        assert ours.dtype == np.float32
        # within one 8-bit level (1/255), measured in normalised units (+ float32 rounding)
        assert np.abs(ours - theirs).max() <= (1 / 255) / min(pp.std) + 1e-6, path.name


def test_preprocessing_resolved_from_the_weights():
    assert get_architecture("resnet50").preprocessing == Preprocessing(224, 232, "bilinear")
    lite = get_architecture("efficientnet_lite0").preprocessing
    assert (lite.input_size, lite.resize_size, lite.interpolation, lite.mean) == (224, 256, "bicubic", (0.5, 0.5, 0.5))
    assert get_architecture("efficientnet_lite2").preprocessing.input_size == 260


def test_preprocessing_roundtrips_and_rejects_bad_values():
    pp = Preprocessing(240, 274, "bicubic", (0.5, 0.5, 0.5), (0.25, 0.5, 0.5))
    assert Preprocessing.from_dict(pp.to_dict()) == pp
    with pytest.raises(ValueError, match="interpolation='lanczos'"):
        Preprocessing(interpolation="lanczos")
    with pytest.raises(ValueError, match="input_size <= resize_size"):
        Preprocessing(input_size=300, resize_size=256)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_modes_become_rgb(mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 20, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray((np.arange(600, dtype=np.uint16).reshape(30, 20) * 100))
        assert img.mode == "I;16"
        data = encode(img, "PNG")
    else:
        data = encode(rgb.convert(mode), "TIFF" if mode == "CMYK" else "PNG")
    out = load_image(data)
    assert out.mode == "RGB" and out.size == (20, 30)
    if mode == "I;16":  # the full 16-bit range is scaled, not clipped at 255
        arr = np.asarray(out)[..., 0]
        assert arr.min() == 0 and arr.max() == 255 and len(np.unique(arr)) > 100


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(load_image(encode(img, "PNG")))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    out = load_image(encode(img, "JPEG", exif=exif))
    assert out.size == (20, 40)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    r, g, b = np.asarray(load_image(data))[8, 8]
    assert r > 200 and b < 50


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_supported_formats_decode(fmt):
    img = Image.new("RGB", (33, 17), (0, 128, 255))
    out = preprocess(encode(img, fmt), Preprocessing())
    assert out.shape == (3, 224, 224)


def test_bad_inputs_raise_readable_errors(tmp_path):
    good = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(ImageDecodeError, match="empty image"):
        load_image(b"")
    with pytest.raises(ImageDecodeError, match="not an image"):
        load_image(b"hello, this is text and not a picture")
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        load_image(good[: len(good) // 2])
    with pytest.raises(ImageDecodeError, match="unsupported image format PPM"):
        load_image(encode(Image.new("RGB", (8, 8)), "PPM"))
    with pytest.raises(ImageDecodeError, match="over the limit of 1000"):
        load_image(good, max_pixels=1000)
    missing = tmp_path / "nope.jpg"
    with pytest.raises((ImageDecodeError, FileNotFoundError)):
        load_image(missing)


def test_preprocess_from_path_equals_from_bytes(hymenoptera):
    path = next((hymenoptera / "val" / "ants").glob("*.jpg"))
    pp = Preprocessing()
    np.testing.assert_array_equal(preprocess(path, pp), preprocess(path.read_bytes(), pp))


def test_serving_side_imports_no_torch():
    """models.preprocessing/runtime/store/artifact must not pull in torch (lean serving image)."""
    import subprocess
    import sys

    code = ("import sys, models, models.preprocessing, models.runtime, models.store, models.artifact, models.samples;"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def _upscaled_jpeg(path: Path, size: tuple[int, int], folder: Path) -> Path:
    """A real photo enlarged to `size` (landscape; swapped for portrait) and saved as a phone-sized JPEG."""
    img = Image.open(path).convert("RGB")
    w, h = size if img.width >= img.height else size[::-1]
    out = folder / f"{path.stem}-{w}x{h}.jpg"
    img.resize((w, h), Image.Resampling.BILINEAR).save(out, "JPEG", quality=90)
    return out


@pytest.mark.parametrize("size,expected", [((4032, 3024), (2016, 1512)), ((2048, 1536), (1024, 768)),
                                           ((1600, 1200), (1600, 1200))])
def test_large_jpegs_decode_at_a_reduced_scale_that_keeps_enough_pixels(size, expected, tmp_path):
    pp = Preprocessing()  # resize 256, draft factor 3: the decoded shorter side stays >= 768
    photo = _upscaled_jpeg(sample_photos()[0], size, tmp_path)
    assert max(decode(photo, pp).size) == max(expected) and min(decode(photo, pp).size) == min(expected)
    assert decode(photo, Preprocessing(jpeg_draft_factor=0)).size == load_image(photo).size  # 0: full decode
    png = tmp_path / "big.png"
    Image.open(photo).save(png)
    assert decode(png, pp).size == load_image(png).size  # only JPEG has a draft mode


def test_draft_decoding_keeps_the_models_answers(hymenoptera, tmp_path):
    """Draft decoding changes pixels a little (DCT scaling before the resize); the model's answers must not
    change. Real photos at 12 and 3 megapixels, the built-in ImageNet model (1000 classes, where small pixel
    changes show first). Measured over all 153 val photos at 5 sizes: probabilities move by <= 0.037 at
    factor 3 and up to 0.14 at factor 1 (0.086 on these photos), which this test refuses."""
    from tuneserve.models.runtime import OnnxClassifier, softmax
    from support import builtin_model

    model = builtin_model()
    pp = model.card.preprocessing
    full = dataclasses.replace(pp, jpeg_draft_factor=0)
    assert pp.jpeg_draft_factor == 3 and full.draft_size is None
    photos = [_upscaled_jpeg(p, size, tmp_path) for p in real_photos(hymenoptera)
              for size in [(4032, 3024), (2048, 1536)]]
    drafted, exact = (np.stack([preprocess_pixels(p, prep) for p in photos]) for prep in (pp, full))  # uint8
    pixel_diff = np.abs(drafted.astype(np.int16) - exact)  # in 1/255 units
    assert pixel_diff.mean() < 1.0, pixel_diff.mean()
    session = OnnxClassifier(model.onnx_path, "cpu")
    p_drafted, p_exact = (softmax(session(session.inputs(pixels, prep)))
                          for pixels, prep in ((drafted, pp), (exact, full)))
    assert np.abs(p_drafted - p_exact).max() <= 0.05
    # The same top-1 wherever the full decode's answer is not a coin toss (one photo here is 0.407 vs 0.403):
    # 20 of these 22 photos (18 of the stand-in's crops without ../shared).
    top2 = np.sort(p_exact, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.02
    assert clear.sum() >= 0.75 * len(photos)
    np.testing.assert_array_equal(p_drafted.argmax(1)[clear], p_exact.argmax(1)[clear])


def test_artifacts_from_before_draft_decoding_keep_full_decodes():
    old = {k: v for k, v in Preprocessing().to_dict().items() if k != "jpeg_draft_factor"}
    assert Preprocessing.from_dict(old).draft_size is None
    assert Preprocessing.from_dict(Preprocessing().to_dict()).draft_size == 3 * 256
    with pytest.raises(ValueError, match="jpeg_draft_factor must be 0"):
        Preprocessing(jpeg_draft_factor=-1)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("size", [(500, 375), (375, 500), (97, 61), (40, 40), (32, 48), (1001, 333)])
def test_resizing_only_the_crop_matches_resizing_the_whole_image(size, interpolation):
    """eval_transform resamples only the crop's columns; the result must be the full resize + crop's, within
    one 8-bit level: landscape, portrait, upscaled, already at size, and odd shapes."""
    from tuneserve.models.preprocessing import center_crop, resize_and_crop, resize_shorter_side

    rng = np.random.default_rng(sum(size))
    smooth = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    noisy = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    pp = Preprocessing(input_size=32, resize_size=40, interpolation=interpolation)
    for img in (smooth, noisy):
        whole = np.asarray(center_crop(resize_shorter_side(img, 40, interpolation), 32), dtype=np.int16)
        ours = np.asarray(resize_and_crop(img, pp), dtype=np.int16)
        assert ours.shape == whole.shape == (32, 32, 3)
        assert np.abs(ours - whole).max() <= 1
