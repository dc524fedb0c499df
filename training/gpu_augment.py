"""Training augmentation on whole batches, on the training device: the GPU half of the cached pipeline.

Input: uint8 (B, S, S, 3) from the decoded-image cache (training/image_cache.py), already on the device.
Output: float32 (B, 3, s, s) normalised with the weights' mean/std, s = the model's input size.

- RandomResizedCrop, per image, with torchvision's parameters (scale 0.08-1, aspect ratio 3/4-4/3, ten
  tries then the centre), done as one `torchvision.ops.roi_align` call: each image's box is cut out and
  resized to s x s bilinearly, averaging ceil(box/s) samples per output pixel when shrinking.
- Horizontal flip, per image (augment "flip" and "trivialaugment").
- TrivialAugmentWide (augment "trivialaugment"), torchvision's own transform, applied to groups of
  `ta_group` images: one random operation and strength per group rather than per image, because the
  transform draws once per call and calling it per image would cost a kernel launch per image.
Random parameters come from torch's global CPU generator, which train() reseeds at every epoch: a resumed
run draws the same crops as an uninterrupted one.
"""
from __future__ import annotations

import math

import torch
from torchvision.ops import roi_align
from torchvision.transforms import v2 as T

from tuneserve.models.preprocessing import Preprocessing

SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop defaults (TrainConfig.crop_scale chooses the lower bound)
RATIO = (3 / 4, 4 / 3)
TRIES = 10


def crop_boxes(batch: int, size: int, generator: torch.Generator | None = None,
               scale: tuple[float, float] = SCALE) -> torch.Tensor:
    """RandomResizedCrop boxes for `batch` square images of side `size`: float32 (B, 4) as x1, y1, x2, y2 in
    pixels (x2, y2 exclusive), drawn like torchvision's RandomResizedCrop.get_params, vectorised."""
    area = float(size * size)
    target = area * torch.empty(batch, TRIES).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(batch, TRIES).uniform_(math.log(RATIO[0]), math.log(RATIO[1]), generator=generator)
    ratio = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target * ratio))
    h = torch.round(torch.sqrt(target / ratio))
    ok = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((batch,), -1))
    pick = first.clamp(min=0)
    w = torch.where(first >= 0, w[torch.arange(batch), pick], torch.full((batch,), float(size)))  # fallback: whole
    h = torch.where(first >= 0, h[torch.arange(batch), pick], torch.full((batch,), float(size)))  # (square) image
    u = torch.rand(batch, 2, generator=generator)
    x1 = torch.floor(u[:, 0] * (size - w + 1))
    y1 = torch.floor(u[:, 1] * (size - h + 1))
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, out: int) -> torch.Tensor:
    """images: float32 (B, 3, S, S); boxes: (B, 4) pixel boxes -> float32 (B, 3, out, out), bilinear.
    `aligned=True` puts pixel i's centre at i + 0.5, so a box equal to the image at its own size is the
    identity; sampling_ratio=0 averages ceil(box/out) samples per output pixel (anti-aliasing when shrinking)."""
    index = torch.arange(len(images), dtype=boxes.dtype, device=boxes.device)[:, None]
    rois = torch.cat([index, boxes], dim=1).to(images.device, images.dtype)
    return roi_align(images, rois, output_size=(out, out), spatial_scale=1.0, sampling_ratio=0, aligned=True)


class GpuAugment:
    def __init__(self, pp: Preprocessing, augment: str, ta_group: int = 8, crop_scale: float = SCALE[0]):
        if augment not in ("none", "flip", "trivialaugment"):
            raise ValueError(f"augment {augment!r} is not one of: none, flip, trivialaugment")
        self.pp = pp
        self.augment = augment
        self.ta_group = ta_group
        self.scale = (crop_scale, 1.0)
        self.trivial = T.TrivialAugmentWide(interpolation=T.InterpolationMode.BILINEAR) if augment == "trivialaugment" else None

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """batch: uint8 (B, S, S, 3) on the training device -> float32 (B, 3, s, s), normalised."""
        b, size = batch.shape[0], batch.shape[1]
        x = batch.permute(0, 3, 1, 2).float()  # (B, 3, S, S), 0..255
        if self.augment == "none":  # the centre crop evaluation uses (at the cached resolution)
            off = (size - self.pp.input_size) // 2
            boxes = torch.tensor([[off, off, off + self.pp.input_size, off + self.pp.input_size]] * b, dtype=torch.float32)
        else:
            boxes = crop_boxes(b, size, scale=self.scale)
        x = crop_resize(x, boxes, self.pp.input_size)  # (B, 3, s, s)
        if self.augment in ("flip", "trivialaugment"):
            flip = (torch.rand(b) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.trivial is not None:
            u8 = x.round_().clamp_(0, 255).to(torch.uint8)
            x = torch.cat([self.trivial(chunk) for chunk in u8.split(self.ta_group)]).float()
        mean = torch.tensor(self.pp.mean, device=x.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.pp.std, device=x.device).view(1, 3, 1, 1) * 255
        return (x - mean) / std
