"""The cached training pipeline: decoded-image cache, batched crop/flip/normalise on the device (CPU here),
and a fine-tune that runs on it. Under torchrun (local rank 0 builds the cache, rank 1 waits): the FSDP CLI test
in test_sharding.py, which trains from the cache."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from PIL import Image

from tuneserve.models.preprocessing import Preprocessing, center_crop, decode, preprocess, resize_shorter_side
from tuneserve.models.samples import sample_photos
from tuneserve.training.cached_loader import CachedLoader
from tuneserve.training.gpu_augment import RATIO, SCALE, GpuAugment, crop_boxes, crop_resize
from tuneserve.training.data import Sample
from tuneserve.training.image_cache import cache_path, decode_square, open_cache
from tuneserve.training.loaders import EvalTransform, ImageDataset


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def test_crop_resize_is_exact_at_native_scale():
    x = _images(2, 32).permute(0, 3, 1, 2).float()
    whole = crop_resize(x, torch.tensor([[0.0, 0, 32, 32]] * 2), 32)
    torch.testing.assert_close(whole, x, rtol=0, atol=1e-4)  # the whole image at its own size: identity
    part = crop_resize(x, torch.tensor([[4.0, 6, 20, 22], [0, 0, 16, 16]]), 16)
    torch.testing.assert_close(part[0], x[0, :, 6:22, 4:20], rtol=0, atol=1e-4)  # x1, y1, x2, y2 in pixels
    torch.testing.assert_close(part[1], x[1, :, :16, :16], rtol=0, atol=1e-4)


def test_crop_boxes_follow_random_resized_crop():
    g = torch.Generator().manual_seed(0)
    boxes = crop_boxes(4096, 256, generator=g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 256).all() and (w >= 1).all() and (h >= 1).all()
    area = w * h / 256**2
    assert area.min() >= SCALE[0] * 0.9 and area.max() <= 1.0
    assert ((w / h) >= RATIO[0] * 0.9).all() and ((w / h) <= RATIO[1] * 1.1).all()
    assert 0.45 < area.mean() < 0.6  # torchvision's RandomResizedCrop averages ~0.5 of the area
    torch.testing.assert_close(crop_boxes(8, 256, torch.Generator().manual_seed(1)),
                               crop_boxes(8, 256, torch.Generator().manual_seed(1)))


def test_augment_none_is_the_normalised_centre_crop():
    pp = Preprocessing(input_size=24, resize_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    batch = _images(3, 32)
    out = GpuAugment(pp, "none")(batch)
    assert out.shape == (3, 3, 24, 24) and out.dtype == torch.float32
    centre = batch[:, 4:28, 4:28].permute(0, 3, 1, 2).float() / 255
    expected = (centre - torch.tensor(pp.mean).view(1, 3, 1, 1)) / torch.tensor(pp.std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("augment", ["flip", "trivialaugment"])
def test_random_augmentations_give_normalised_batches_that_vary(augment):
    pp = Preprocessing(input_size=24, resize_size=32)
    batch = _images(16, 32)
    torch.manual_seed(0)
    a = GpuAugment(pp, augment)(batch)
    torch.manual_seed(0)
    b = GpuAugment(pp, augment)(batch)
    c = GpuAugment(pp, augment)(batch)
    assert a.shape == (16, 3, 24, 24) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)  # the global RNG decides: reseeding reproduces (resume)
    assert not torch.equal(a, c)


def test_cache_holds_the_decoded_squares_and_is_reused(tiny_folder, tmp_path):
    paths = sorted(str(p) for p in tiny_folder.rglob("*.png"))
    pp = Preprocessing(input_size=16, resize_size=24)
    cache = open_cache(paths, pp, tmp_path)
    assert cache.shape == (len(paths), 24, 24, 3) and cache.dtype == np.uint8
    np.testing.assert_array_equal(cache[5], decode_square(paths[5], pp))
    target = cache_path(paths, pp, tmp_path)
    built = target.stat().st_mtime_ns
    open_cache(paths, pp, tmp_path)
    assert target.stat().st_mtime_ns == built  # reused, not rebuilt
    # What the pixels depend on names the cache: resize size, interpolation, draft decoding, the files.
    assert cache_path(paths, Preprocessing(input_size=16, resize_size=24, interpolation="bicubic"), tmp_path) != target
    assert cache_path(paths, Preprocessing(input_size=16, resize_size=24, jpeg_draft_factor=0), tmp_path) != target
    os.utime(paths[0], ns=(0, 0))  # a changed file: a different cache
    assert cache_path(paths, pp, tmp_path) != target


def test_failed_cache_build_leaves_nothing(tiny_folder, tmp_path):
    paths = sorted(str(p) for p in tiny_folder.rglob("*.png"))
    bad = tiny_folder / "alpha" / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(Exception, match="image"):
        open_cache(paths + [str(bad)], Preprocessing(input_size=16, resize_size=24), tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # no cache, no temporary file


def test_cached_loader_yields_every_image_once_with_its_label():
    cache = np.stack([np.full((8, 8, 3), i, np.uint8) for i in range(10)])  # image i is all i
    pp = Preprocessing(input_size=8, resize_size=8, mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))
    sampler = torch.utils.data.RandomSampler(range(10))
    loader = CachedLoader(cache, [i % 3 for i in range(10)], 4, sampler, False, torch.device("cpu"), GpuAugment(pp, "none"))
    seen = []
    for x, y in loader:
        ids = x[:, 0, 0, 0].round().long()  # mean 0, std 1/255: the normalised value is the pixel value
        assert (y == ids % 3).all()
        seen += ids.tolist()
    assert sorted(seen) == list(range(10)) and len(loader) == 3
    assert len(CachedLoader(cache, [0] * 10, 4, sampler, True, torch.device("cpu"), GpuAugment(pp, "none"))) == 2


def test_cached_loader_keeps_the_sampled_order_while_it_reuses_its_batch_buffers():
    """25 images in batches of 2 through a ring of 3 buffers (prefetch 1): every batch holds its images in the
    order the sampler drew them, the ragged last one too, though each buffer is refilled four times over."""
    cache = np.stack([np.full((8, 8, 3), i, np.uint8) for i in range(25)])
    pp = Preprocessing(input_size=8, resize_size=8, mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))
    order = torch.randperm(25, generator=torch.Generator().manual_seed(4)).tolist()
    loader = CachedLoader(cache, list(range(25)), 2, order, False, torch.device("cpu"), GpuAugment(pp, "none"),
                          prefetch=1)
    batches = [(x[:, 0, 0, 0].round().long().tolist(), y.tolist()) for x, y in loader]
    assert [ids for ids, _ in batches] == [order[i:i + 2] for i in range(0, 25, 2)]
    assert all(ids == labels for ids, labels in batches)


@pytest.mark.slow
def test_fine_tune_on_the_cache_pipeline_is_deterministic(tiny_folder, tmp_path):
    from tuneserve.training.config import TrainConfig
    from tuneserve.training.train import train

    def run(out: str) -> list[dict]:
        # On the CPU: the RNG order is what is tested; CUDA's autotuned kernels are not bit-reproducible.
        cfg = TrainConfig(data=str(tiny_folder), epochs=2, head_epochs=1, batch_size=4, loader_workers=0, pipeline="cache",
                          cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / out), export=False, seed=3,
                          device="cpu")
        return json.loads((train(cfg).run_dir / "history.json").read_text())

    first, second = run("a"), run("b")
    assert [h["train_loss"] for h in first] == [h["train_loss"] for h in second]
    assert first[-1]["train_images"] == 12 and len(list((tmp_path / "cache").iterdir())) == 1


def test_every_training_pipeline_decodes_like_serving(tmp_path):
    """A 12-MP JPEG (draft-decoded): validation's loader gives exactly the array serving computes, and the
    cache and the augmenting loader start from the same decoded image."""
    pp = Preprocessing(input_size=224, resize_size=256, interpolation="bicubic")
    photo = tmp_path / "big.jpg"
    Image.open(sample_photos()[0]).convert("RGB").resize((4032, 3024)).save(photo, "JPEG", quality=90)
    image = decode(photo, pp)
    assert image.size == (2016, 1512)  # drafted to 1/2: what every pipeline below must start from
    val = ImageDataset([Sample(str(photo), 0)], pp, EvalTransform(pp))
    np.testing.assert_array_equal(val[0][0].numpy(), preprocess(photo.read_bytes(), pp))
    square = np.asarray(center_crop(resize_shorter_side(image, 256, "bicubic"), 256))
    np.testing.assert_array_equal(decode_square(str(photo), pp), square)
    train = ImageDataset([Sample(str(photo), 0)], pp, lambda img: img.size)
    assert train[0] == (image.size, 0)
