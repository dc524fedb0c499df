"""torch Datasets and DataLoaders over checked samples.

Validation uses models.preprocessing.eval_transform (the one transform shared with export and serving),
always. Training has two pipelines: "pil" adds torchvision's random augmentation on top of the same decode
(models.preprocessing.decode) in DataLoader workers, every epoch; "cache" decodes once into a uint8
cache and augments whole batches on the training device (training/image_cache.py, gpu_augment.py).
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from tuneserve.models.preprocessing import Preprocessing, decode, eval_transform
from tuneserve.training.config import TrainConfig
from tuneserve.training.data import Dataset, Sample
from tuneserve.training.cached_loader import CachedLoader
from tuneserve.training.distributed import DistEnv, barrier
from tuneserve.training.gpu_augment import SCALE, GpuAugment
from tuneserve.training.image_cache import open_cache


class ImageDataset(torch.utils.data.Dataset):
    """Samples decoded as the model's preprocessing decodes them (models.preprocessing.decode), then `transform`."""

    def __init__(self, samples: list[Sample], pp: Preprocessing, transform):
        self.samples = samples
        self.pp = pp
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        s = self.samples[i]
        return self.transform(decode(s.path, self.pp)), s.label  # float32 (3, S, S), int


class EvalTransform:
    """Picklable wrapper (DataLoader workers) of the shared numpy eval transform."""

    def __init__(self, pp: Preprocessing):
        self.pp = pp

    def __call__(self, img) -> torch.Tensor:
        return torch.from_numpy(eval_transform(img, self.pp))


def train_transform(pp: Preprocessing, augment: str, crop_scale: float = SCALE[0]) -> T.Compose:
    """Random crop of at least `crop_scale` of the photo's area (torchvision's default 0.08), then `augment`."""
    interp = InterpolationMode(pp.interpolation)
    steps: list = [T.RandomResizedCrop(pp.input_size, scale=(crop_scale, 1.0), interpolation=interp, antialias=True)]
    if augment in ("flip", "trivialaugment"):
        steps.append(T.RandomHorizontalFlip())
    if augment == "trivialaugment":
        steps.append(T.TrivialAugmentWide(interpolation=interp))
    steps += [T.PILToTensor(), T.ToDtype(torch.float32, scale=True), T.Normalize(pp.mean, pp.std)]
    return T.Compose(steps)


class ShardSampler(Sampler[int]):
    """Rank r takes items r, r+W, r+2W...: every item exactly once across ranks (DistributedSampler pads
    with duplicates, which would skew validation metrics)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = list(range(rank, n, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def make_loaders(ds: Dataset, pp: Preprocessing, cfg: TrainConfig, env: DistEnv):
    """-> (train_loader, val_loader, train_sampler if distributed else None)."""
    workers = cfg.effective_loader_workers(env.world_size)
    # Training workers are re-created each epoch (cheap with fork): their augmentation seeds then come from
    # the RNG that train() reseeds per epoch, which keeps resumed runs identical to uninterrupted ones.
    common = dict(num_workers=workers, pin_memory=env.device.type == "cuda", persistent_workers=False)
    if workers > 0:
        common["prefetch_factor"] = 4
    train_set = ImageDataset(ds.train, pp, train_transform(pp, cfg.augment, cfg.crop_scale))
    if env.distributed:
        train_sampler = DistributedSampler(train_set, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=cfg.seed)
        sampler: Sampler = train_sampler
    else:
        train_sampler = None
        # Drawn from the global torch RNG, which train() reseeds at every epoch: resumable and deterministic.
        sampler = RandomSampler(train_set)
    per_rank = -(-len(train_set) // env.world_size)
    # A last batch of 1 breaks BatchNorm in train mode; drop the ragged tail when there is more than one batch.
    drop_last = per_rank > cfg.batch_size
    if resolve_pipeline(cfg.pipeline, env) == "cache":
        train_loader = cached_train_loader(ds, pp, cfg, env, sampler, drop_last)
    else:
        train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=drop_last, **common)
    return train_loader, eval_loader(ds.val, pp, cfg, env), train_sampler


def eval_loader(samples: list[Sample], pp: Preprocessing, cfg: TrainConfig, env: DistEnv) -> DataLoader:
    """`samples` through the eval transform (no augmentation), each rank its shard: validation, and the training
    photos the head probe fits on."""
    workers = cfg.effective_loader_workers(env.world_size)
    extra = {"prefetch_factor": 4} if workers > 0 else {}
    photos = ImageDataset(samples, pp, EvalTransform(pp))
    return DataLoader(photos, batch_size=cfg.batch_size * 2, sampler=ShardSampler(len(photos), env.rank, env.world_size),
                      num_workers=workers, pin_memory=env.device.type == "cuda", persistent_workers=False, **extra)


def resolve_pipeline(pipeline: str, env: DistEnv) -> str:
    if pipeline == "auto":
        return "cache" if env.device.type == "cuda" else "pil"
    return pipeline


def cached_train_loader(ds: Dataset, pp: Preprocessing, cfg: TrainConfig, env: DistEnv, sampler: Sampler,
                        drop_last: bool) -> CachedLoader:
    """Local rank 0 of each node builds the cache if it is missing (the others wait), then every rank maps it."""
    paths = [s.path for s in ds.train]
    args = (paths, pp, cfg.cache_dir or None)
    cache = open_cache(*args, build=True) if env.local_rank == 0 else None
    barrier(env)
    if cache is None:
        cache = open_cache(*args, build=False)
    return CachedLoader(cache, [s.label for s in ds.train], cfg.batch_size, sampler, drop_last, env.device,
                        GpuAugment(pp, cfg.augment, crop_scale=cfg.crop_scale))
