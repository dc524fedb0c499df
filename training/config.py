"""Fine-tuning configuration: one dataclass, whose fields are also the CLI flags and the config-file keys.

Defaults are chosen for fine-tuning an ImageNet-pretrained CNN on a small labelled folder (hundreds to tens of
thousands of images); the reason for each sits beside it. Precedence: defaults < --config FILE < CLI flags.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneserve.models.architectures import ARCHITECTURES, DEFAULT_ARCH


def _opt(default: Any, help: str, **choices: Any) -> Any:
    return field(default=default, metadata={"help": help, **choices})


CLASS_WEIGHTINGS = ("auto", "none", "inverse", "sqrt")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")  # torch.compile's own: the compiler, and its two debug stages
DEFAULT_COMPILE_BACKEND = COMPILE_BACKENDS[0]
# From this ratio of the largest to the smallest training class, "auto" weights the loss; under it is the ordinary
# spread of a hand-collected set (leeds-butterfly: 55 to 100 photos a class), which the plain loss handles.
IMBALANCE_RATIO = 3.0


@dataclass
class TrainConfig:
    # data
    data: str = _opt("", "image folder: class subfolders, or train/ and val/ each with class subfolders")
    manifest: str | None = _opt(None, "CSV of path,label rows (paths relative to the CSV) instead of subfolders")
    val_fraction: float = _opt(0.2, "share of each class held out for validation when there is no val/ folder")
    min_images_per_class: int = _opt(2, "refuse classes with fewer usable training images than this")
    # model
    arch: str = _opt(DEFAULT_ARCH, "network to fine-tune", choices=tuple(ARCHITECTURES))
    weights: str = _opt("imagenet", "'imagenet' (official weights), 'none', or a local state-dict .pth path")
    image_size: int = _opt(0, "side of the square the network sees, in training, export and serving (0: the "
                           "architecture's own, 224 for most); the resize before the crop keeps its proportion")
    init_from: str | None = _opt(None, "continue from a registered tuneserve model (TAG: name or name:version): "
                                 "its architecture and trained weights; classes it knew keep their head rows")
    # schedule: a short frozen-backbone phase trains the new head before its random gradients reach the
    # pretrained features, then everything trains with the backbone at a lower learning rate, in cycles for as long
    # as validation keeps improving (training/schedule.py). A fixed "8 epochs whatever the data" stopped a set of
    # 1,050 greyscale photos while it was still learning (docs/training.md, "How long a run trains").
    epochs: int = _opt(0, "0: adaptive: an 8-epoch cycle, then shorter ones while validation still improved at the "
                       "end of the last (at most --max-epochs, within --time-budget); N: exactly N epochs, one cosine")
    max_epochs: int = _opt(30, "adaptive schedule: at most this many epochs")
    time_budget: str = _opt("", "adaptive schedule: finish within this wall time (90s, 20m, 1h30m), export included; "
                            "the cycles are fitted to what is left")
    # Off: on hymenoptera the probed head then fine-tuning ended at the probe's own 94.8% top-1, where two
    # head-only epochs reached 96.7% (docs/benchmarks.md, "The adaptive schedule").
    probe_head: bool = _opt(False, "fit the new head as a logistic regression on the frozen backbone's features "
                            "before fine-tuning (LP-FT) instead of head-only epochs; not with --init-from, whose head "
                            "is already trained, nor --weights none")
    # On: on hymenoptera at 64 px every fine-tuned epoch stayed under the probe (85.0% against 89.5%): the run then
    # exports the probe, as it exports the best epoch (docs/benchmarks.md, "The adaptive schedule").
    probe_candidate: bool = _opt(True, "also fit that logistic regression, judge the frozen backbone with it on the "
                                 "validation photos, and export it when no fine-tuned epoch does better (one pass "
                                 "over the training photos and one over validation)")
    head_epochs: int = _opt(-1, "first epochs train only the head (backbone frozen, BatchNorm statistics kept); "
                            "-1: none when the head is probed, else min(2, epochs - 1)")
    batch_size: int = _opt(32, "images per optimizer step per process (before gradient accumulation)")
    grad_accum_steps: int = _opt(1, "optimizer step every N batches: effective batch = batch_size * N * world size")
    lr: float = _opt(1e-3, "peak AdamW learning rate of the head, used as given: scale it yourself for a larger "
                      "effective batch (linear rule: x k for k x the batch; docs/training.md)")
    # 0.3 (3e-4): on 64 px aerial photos (rsscn7-64px, 80 a class) 0.1 ended at 81.1% top-1 with training top-1
    # below validation (underfitting: ImageNet features barely moved), 0.3 at 88.2% (docs/benchmarks.md).
    backbone_lr_mult: float = _opt(0.3, "backbone learning rate = lr * this, once unfrozen (lower keeps ImageNet "
                                   "features closer; higher adapts them to photos unlike ImageNet's)")
    weight_decay: float = _opt(0.05, "AdamW decoupled weight decay (not applied to biases and norm weights)")
    warmup_epochs: float = _opt(0.5, "linear warm-up at the start of each phase, then cosine decay to zero")
    label_smoothing: float = _opt(0.1, "cross-entropy label smoothing: better calibrated, less over-confident heads",
                                  aliases=("--smoothing",))
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0 disables)", aliases=("--clip-grad",))
    # auto: where one class held 73% of the photos, the unweighted head answered that class for every photo for
    # its two epochs; sqrt weights did not, and ended within one validation photo of it (90.0 against 90.9% top-1),
    # where inverse weights cost 7 points (83.6%) (docs/benchmarks.md, "The default recipe on other photo sets").
    class_weighting: str = _opt("auto", "loss weight per class: inverse (N / (classes x count): every class weighs the "
                                "same in total), sqrt (its square root, milder), auto (sqrt when the largest "
                                "training class has >= 3x the photos of the smallest, else none), none",
                                choices=CLASS_WEIGHTINGS)
    # torchvision's 0.08 is for training from scratch on ImageNet's large photos; a 0.08 crop of a 64 px photo is an
    # 18 px patch blown up to 224. 0.35 keeps it at 38 px or more, and measured within noise of 0.08 (79.6 against
    # 81.1% top-1 on 280 photos of 64 px aerial scenes).
    crop_scale: float = _opt(0.35, "smallest share of a photo's area a random training crop keeps (upper bound 1)")
    augment: str = _opt("trivialaugment", "training augmentation", choices=("none", "flip", "trivialaugment"))
    patience: int = _opt(4, "stop when validation top-1 has not improved for this many epochs (0 disables); in the "
                         "adaptive schedule's first cycle only")
    # Batch mixing (torchvision.transforms.v2): off by default until the accuracy benchmark says otherwise.
    mixup: float = _opt(0.0, "MixUp Beta(alpha, alpha) on each training batch (0 disables; timm uses 0.8)")
    cutmix: float = _opt(0.0, "CutMix Beta(alpha, alpha) on each training batch (0 disables; timm uses 1.0); with "
                         "--mixup too, each batch gets one of the two at random")
    # Weight EMA (timm's --model-ema), off by default: a smoothed copy of the weights that often generalises a
    # little better at the end of a run, at the cost of one more model in memory and one more validation pass.
    ema: bool = _opt(False, "keep an exponential moving average of the weights, BatchNorm statistics included "
                     "(torch.optim.swa_utils.AveragedModel), updated after every optimizer step; its validation "
                     "metrics pick the best epoch and early stopping, and it is what gets exported",
                     aliases=("--model-ema",))
    # timm's 0.9998 averages ~5,000 steps: longer than a whole short fine-tune (hymenoptera: 64 steps), whose EMA
    # would still be mostly the random initial head at the end.
    ema_decay: float = _opt(-1.0, "--ema's decay per optimizer step, in (0, 1); -1: derived from the run's length, "
                            "1 - 10 / total optimizer steps (averages the last tenth of the run), at most 0.9998",
                            aliases=("--model-ema-decay",))
    # tracking
    report_to: str = _opt("none", "experiment tracking: tensorboard, mlflow, both comma-separated, or none "
                          "(pip install 'tuneserve[tracking]')")
    tracking_uri: str | None = _opt(None, "MLflow tracking URI (a server's http://..., or a store); default: "
                                    "the file store OUTPUT_DIR/mlruns")
    # hardware
    device: str = _opt("auto", "where to train", choices=("auto", "cuda", "cpu"))
    amp: bool = _opt(True, "mixed precision on CUDA (bf16 where supported, else fp16 + GradScaler); CPU stays fp32")
    channels_last: bool = _opt(True, "NHWC memory format on CUDA: faster convolutions on tensor cores")
    loader_workers: int = _opt(-1, "DataLoader worker processes per rank, for --pipeline pil (-1: min(8, CPUs per rank))")
    # A PIL DataLoader feeds ~1,500 img/s on 16 cores; an H100 trains ResNet-50 at ~5,600 (docs/training.md, "Feeding the GPU").
    pipeline: str = _opt("auto", "training input: pil (decode + augment every epoch in DataLoader workers), cache "
                         "(decode once into a uint8 cache, augment on the device), auto (cache on CUDA, pil on CPU)",
                         choices=("auto", "pil", "cache"))
    cache_dir: str = _opt("", "where --pipeline cache keeps decoded images (default: ~/.cache/tuneserve/decoded)")
    sync_bn: bool = _opt(False, "SyncBatchNorm across ranks (for small per-GPU batches under DDP; CUDA only)")
    # Post-local SGD (Lin et al. 2018): after a synchronous warm-up, ranks step on their own gradients and
    # average parameters every K steps: 1/K of DDP's all-reduce traffic, for slow interconnects or many nodes.
    local_sgd_period: int = _opt(0, "0: synchronous DDP (gradients all-reduced every step); K >= 2: local SGD, "
                                 "parameters averaged across ranks every K optimizer steps")
    local_sgd_warmup_steps: int = _opt(0, "local SGD only: this many synchronous DDP optimizer steps first")
    local_sgd_intra_node: bool = _opt(False, "local SGD only: between averagings, still all-reduce gradients among "
                                      "the ranks of each node, so only inter-node traffic becomes periodic")
    # DDP keeps weights, gradients and AdamW moments whole on every GPU (~16 bytes/parameter with AMP);
    # FSDP divides them by the number of ranks (docs/training.md, "Beyond one GPU's memory").
    shard: str = _opt("none", "none: DDP (every rank holds the whole model); fsdp: FSDP2 shards parameters, gradients "
                      "and optimizer state across the ranks, for backbones whose training state does not fit one "
                      "GPU (torchrun only; checkpoints stay full)", choices=("none", "fsdp"))
    compile: bool = _opt(False, "torch.compile the training steps (needs a C++ compiler on CPU, Triton on CUDA): "
                         "faster steps after a compilation of a minute or more, and again when the backbone unfreezes; "
                         "checkpoints and export are unchanged", aliases=("--torchcompile",))
    compile_backend: str = _opt(DEFAULT_COMPILE_BACKEND, "torch.compile's backend with --compile: inductor generates fused kernels "
                                "(the speed-up); aot_eager traces and differentiates the same graphs without "
                                "generating code, in seconds instead of a minute (tells a compiler problem from a "
                                "model problem); eager only traces", choices=COMPILE_BACKENDS)
    seed: int = _opt(0, "seed for the split, initialisation of the head, shuffling and augmentation")
    # outputs
    output_dir: str = _opt("runs", "parent directory of run folders (checkpoints, metrics, plots)")
    name: str | None = _opt(None, "model name in the BentoML store (default: <data folder>-<arch>)")
    resume: str | None = _opt(None, "continue an interrupted run from its folder or last.pt")
    export: bool = _opt(True, "export the best checkpoint to ONNX (with the parity gate) and register it")
    # On: one inference pass over the training and validation photos and a 5-fold logistic regression; on 8,192
    # photos of 2,048 features the regression alone takes 12 s on 2 cores. Off where only the model matters
    # (benchmarks/gpu_check.sh times training within a fixed budget).
    diagnostics: bool = _opt(True, "end the run with top_losses.png, label_issues.csv and label_issues.png (the "
                             "validation photos most confidently wrong, the training photos likely mislabelled)")
    parity_images: int = _opt(32, "validation images the ONNX parity gate compares PyTorch and onnxruntime on")
    # 32 images calibrate EfficientNet-Lite0 in ~2 s on 2 CPU cores (MinMax ranges); the variant is kept only
    # where its top-1 agrees with fp32 on >= 99% of the parity images.
    int8_calibration_images: int = _opt(32, "training images that calibrate the INT8 variant made at export for CPU "
                                        "serving (0: no INT8 variant)")
    exporter: str = _opt("dynamo", "torch.onnx exporter", choices=("dynamo", "torchscript"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.class_weighting = _legacy_weighting(self.class_weighting)
        if self.head_epochs == -1:
            self.head_epochs = 0 if self.probes_head() else max(0, min(2, self.first_cycle_epochs() - 1))
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(what)

        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name}={getattr(self, f.name)!r} is not one of: {', '.join(choices)}")
        need(0.0 < self.val_fraction < 1.0, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        need(self.epochs >= 0, f"epochs must be 0 (adaptive) or >= 1, got {self.epochs}")
        need(self.max_epochs >= 1, f"max_epochs must be >= 1, got {self.max_epochs}")
        first = self.first_cycle_epochs()
        need(0 <= self.head_epochs <= first, f"head_epochs must be in [0, {'epochs' if self.epochs else 'the first cycle'}"
             f"={first}], got {self.head_epochs}")
        need(not self.time_budget or not self.epochs,
             f"time_budget={self.time_budget!r} fits the adaptive schedule to the time; epochs={self.epochs} fixes the "
             "run's length: drop one of them (epochs 0 is adaptive)")
        self.time_budget_seconds()  # a ValueError naming the accepted forms
        need(self.image_size == 0 or 32 <= self.image_size <= 1024,
             f"image_size must be 0 (the architecture's own) or in [32, 1024], got {self.image_size}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.grad_accum_steps >= 1, f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.backbone_lr_mult >= 0, f"backbone_lr_mult must be >= 0, got {self.backbone_lr_mult}")
        need(0.0 <= self.label_smoothing < 1.0, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        need(0.0 < self.crop_scale <= 1.0, f"crop_scale must be in (0, 1], got {self.crop_scale}")
        need(self.mixup >= 0 and self.cutmix >= 0, f"mixup and cutmix must be >= 0 (0 disables), got {self.mixup}, "
             f"{self.cutmix}")
        need(self.ema_decay == -1 or 0.0 < self.ema_decay < 1.0,
             f"ema_decay must be in (0, 1), or -1 to derive it from the run's length, got {self.ema_decay}")
        need(self.min_images_per_class >= 1, f"min_images_per_class must be >= 1, got {self.min_images_per_class}")
        need(self.parity_images >= 1, f"parity_images must be >= 1, got {self.parity_images}")
        need(self.int8_calibration_images >= 0, f"int8_calibration_images must be >= 0 (0: no INT8 variant), got "
                                                f"{self.int8_calibration_images}")
        need(self.local_sgd_period == 0 or self.local_sgd_period >= 2,
             f"local_sgd_period must be 0 (synchronous DDP) or >= 2 (average every K steps), got {self.local_sgd_period}"
             + ("; 1 would all-reduce parameters every step, costlier than DDP's gradient all-reduce"
                if self.local_sgd_period == 1 else ""))
        need(self.local_sgd_warmup_steps >= 0, f"local_sgd_warmup_steps must be >= 0, got {self.local_sgd_warmup_steps}")
        need(self.shard == "none" or self.local_sgd_period == 0,
             f"shard={self.shard!r} cannot be combined with local_sgd_period={self.local_sgd_period}: local SGD "
             "averages whole parameters through a DDP communication hook, and FSDP has neither; use --shard none "
             "with --local-sgd-period, or --local-sgd-period 0 with --shard fsdp")
        need(self.compile or self.compile_backend == DEFAULT_COMPILE_BACKEND,
             f"compile_backend={self.compile_backend!r} is used only with compile=True: add --compile, or drop "
             "--compile-backend")
        need(self.shard == "none" or not self.compile,
             f"shard={self.shard!r} cannot be combined with compile=True: torch.compile splits a sharded model at "
             "every FSDP unit and recompiles each block shape, then as dynamic shapes that Inductor fails to compile "
             "('Cannot convert expression to float'); drop --compile, or use --shard none")

    def first_cycle_epochs(self) -> int:
        """epochs (fixed), or the adaptive schedule's first cycle."""
        from tuneserve.training.schedule import FIRST_CYCLE_EPOCHS

        return self.epochs or min(FIRST_CYCLE_EPOCHS, self.max_epochs)

    def probes_head(self) -> bool:
        return self.probe_head and self.fits_probe()

    def fits_probe(self) -> bool:
        """A new head on pretrained features: what a linear probe needs (random features have nothing to probe;
        a continued model's head is trained already)."""
        return (self.probe_head or self.probe_candidate) and not self.init_from and self.weights != "none"

    def time_budget_seconds(self) -> float | None:
        from tuneserve.training.schedule import parse_duration

        return parse_duration(self.time_budget) if self.time_budget else None

    def effective_loader_workers(self, world_size: int = 1) -> int:
        if self.loader_workers >= 0:
            return self.loader_workers
        return max(0, min(8, (os.cpu_count() or 1) // max(1, world_size)))

    def model_name(self) -> str:
        """`name`, or `<data folder>-<arch>` cleaned into a valid store name."""
        if self.name:
            return self.name
        folder = Path(self.manifest or self.data).resolve()
        stem = folder.stem if self.manifest else folder.name
        cleaned = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in f"{stem}-{self.arch}".lower()).strip("-._")
        return cleaned[:63] or self.arch

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """A config saved by to_dict (a checkpoint's, a model card's), including older key names."""
        return cls(**upgrade_saved_config(values))


def _legacy_weighting(value: Any) -> Any:
    """A yes/no class_weighting (in configs and checkpoints that hold one) means inverse frequency or none."""
    if isinstance(value, bool):
        return "inverse" if value else "none"
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
        return "inverse" if value.lower() in ("true", "yes", "1") else "none"
    return value


# Keys that were renamed: configs and checkpoints written with the old name keep working.
LEGACY_KEYS = {"workers": "loader_workers"}
# Keys a saved config (a checkpoint's, a model card's) may lack, with the value such a run trained with, which
# differs from today's default: a resumed or re-exported run keeps what it did.
SAVED_WITHOUT = {"crop_scale": 0.08, "probe_head": False, "probe_candidate": False}


def upgrade_saved_config(values: dict[str, Any]) -> dict[str, Any]:
    """A config saved by to_dict, with renamed keys under their new names and missing keys at the value the run
    used (a config file a user writes gets today's defaults instead: read_config_file)."""
    return {**SAVED_WITHOUT, **{LEGACY_KEYS.get(k, k): v for k, v in values.items()}}


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Keys of a YAML, TOML or JSON file, with '-' accepted for '_'; unknown keys are an error."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {str(p)!r} does not exist")
    text = p.read_text()
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        elif suffix == ".json":
            raw = json.loads(text)
        else:
            raise ValueError(f"config file {p} must end in .yaml, .yml, .toml or .json")
    except ValueError:
        raise
    except Exception as e:  # yaml.YAMLError, tomllib.TOMLDecodeError
        raise ValueError(f"cannot parse config file {p}: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config file {p} must hold a mapping of keys to values, found {type(raw).__name__}")
    raw = raw.get("train", raw) if isinstance(raw.get("train"), dict) else raw  # allow a [train] table
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        name = LEGACY_KEYS.get(name, name)
        if name not in known:
            raise ValueError(f"unknown key {key!r} in {p}; known keys: {', '.join(sorted(known))}")
        out[name] = value
    return out


def make_config(file: str | None = None, **overrides: Any) -> TrainConfig:
    """Defaults < file < overrides (overrides whose value is None are ignored)."""
    values: dict[str, Any] = read_config_file(file) if file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    hints = typing.get_type_hints(TrainConfig)
    return TrainConfig(**{k: _coerce(k, hints[k], v) for k, v in values.items()})


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """Config-file values to the field's type, with an error naming the key and the value."""
    if value is None:
        return None
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)  # X | None -> X
    try:
        if base is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if isinstance(value, (bool, int)):
                return bool(value)
            raise ValueError
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return base(value)
    except (TypeError, ValueError):
        accepted = " (true/false, yes/no or 1/0)" if base is bool else ""
        raise ValueError(f"{name}={value!r} is not a valid {base.__name__}{accepted}") from None
