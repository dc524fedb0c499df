"""Plain helpers for the tests (fixtures are in conftest.py): real photos and small generated images, the
built-in model, a real hymenoptera subset, and the rank functions that tests/test_distributed.py starts with
torch.multiprocessing.spawn (they must live in an importable module). Each rank joins a gloo process group
through the project's own `setup`, runs real training code, and leaves what it saw in a file for the test."""
from __future__ import annotations

import atexit
import contextlib
import faulthandler
import functools
import io
import os
import shutil
import tempfile
import time
import traceback
from multiprocessing import connection as mp_connection
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as torch_mp
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from tuneserve.models.preprocessing import Preprocessing, preprocess_pixels
from tuneserve.models.runtime import OnnxClassifier
from tuneserve.models.samples import sample_photos
from tuneserve.models.store import StoredModel
from tuneserve.models.weights import build_model, head_parameters
from tuneserve.service.engine.batch_metrics import read_batch_sizes
from tuneserve.service.process import free_port
from tuneserve.training.config import TrainConfig
from tuneserve.training.data import Sample
from tuneserve.training.distributed import DistEnv, cleanup, setup
from tuneserve.training.loaders import EvalTransform, ImageDataset
from tuneserve.training.loop import train_one_epoch
from tuneserve.training.schedule import fixed_factor


# --- images and models ------------------------------------------------------------------------------------------

# Registrations whose subject is not the exporter use TorchScript's: 0.7 s for EfficientNet-Lite0 against 6 s
# for torch.export, the default (benchmarks/results/export-time.json), some twenty times a session; and they
# make no INT8 variant (its calibration and agreement check: ~3.5 s a registration). The default exporter
# stays tested where the export is the subject: the built-in model (every served test), test_training's tiny
# run, the compiled run's export, the default architecture's maps in test_explain; the INT8 variant on the
# built-in model (test_runtime, test_service_http) and a fine-tune of real photos (test_distributed).
QUICK_EXPORT: dict[str, Any] = {"exporter": "torchscript", "int8_calibration_images": 0}
QUICK_EXPORT_FLAGS = ["--exporter", "torchscript", "--int8-calibration-images", "0"]  # the same for `tuneserve train`


@functools.lru_cache(maxsize=None)
def builtin_model() -> StoredModel:
    """The built-in ImageNet model in this session's BentoML home (exported once, ~15 s). Under pytest-xdist the
    first worker to ask exports it and leaves a copy of its store folder; the others copy that into their own
    homes instead of exporting again. The copy goes when its worker exits; a worker that asks later exports."""
    from filelock import FileLock

    from tuneserve.models.store import load_model
    from tuneserve.training.builtin import ensure_builtin_model

    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run:
        return ensure_builtin_model()
    shared = Path(tempfile.gettempdir()) / f"tuneserve-test-builtin-{run}"
    with FileLock(f"{shared}.lock"):
        if shared.is_dir():
            name = (shared / "name").read_text()
            shutil.copytree(shared / "store", Path(os.environ["BENTOML_HOME"]) / "models" / name)
            return load_model(name)
        model = ensure_builtin_model()
        shutil.copytree(model.path.parent, shared / "store")  # the name's folder: its version(s) and `latest`
        (shared / "name").write_text(model.name)
        atexit.register(shutil.rmtree, shared, ignore_errors=True)
        atexit.register(Path(f"{shared}.lock").unlink, missing_ok=True)
        return model


def model_inputs(session: OnnxClassifier, sources, pp: Preprocessing) -> np.ndarray:
    """What `session`'s graph takes for real images (paths or bytes): uint8 pixels (N, S, S, 3), or normalised
    float32 (N, 3, S, S) for graphs exported before pixel input."""
    return session.inputs(np.stack([preprocess_pixels(s, pp) for s in sources]), pp)


def photo_path(name: str) -> Path:
    """A real sample photo that ships with an installed package, by file name (coffee.png, chelsea.png, ...)."""
    return next(p for p in sample_photos() if p.name == name)


def photo(name: str) -> bytes:
    return photo_path(name).read_bytes()


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def write_image(path: Path, seed: int, size=(40, 32), fmt: str | None = None) -> Path:
    """A small random RGB PNG/JPEG (format from the suffix unless given); content depends on the seed."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    arr = np.clip(base + rng.integers(-20, 20, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


# The real photos each stand-in class is cut from: living things for "ants", objects for "bees", so that
# ImageNet features separate the classes as they separate real ants from bees.
STANDIN_SOURCES = {"ants": ("chelsea.png", "astronaut.png", "grace_hopper.jpg"),
                   "bees": ("coffee.png", "rocket.jpg")}
STANDIN_COUNTS = {"train": 24, "val": 20}  # per class; the tests take at most 20 and 16 of each


def standin_hymenoptera(root: Path) -> Path:
    """A photo set laid out as hymenoptera ({train,val}/{ants,bees}/*.jpg, one GIF in train/ants) for machines
    without ../shared: camera-sized JPEGs (500 x 375 or 375 x 500, quality 90) cut at random from real sample
    photos that ship with installed packages, flipped and with their brightness varied. Deterministic."""
    from PIL import ImageEnhance, ImageOps

    rng = np.random.default_rng(0)
    for cls, names in STANDIN_SOURCES.items():
        sources = [Image.open(photo_path(n)).convert("RGB") for n in names]
        for split, count in STANDIN_COUNTS.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                img = sources[i % len(sources)]
                w, h = img.size
                side = rng.uniform(0.45, 1.0)
                cw, ch = int(w * side), int(h * side * rng.uniform(0.8, 1.0))
                x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                cut = img.crop((x, y, x + cw, y + ch)).resize((500, 375) if i % 3 else (375, 500))
                if rng.random() < 0.5:
                    cut = ImageOps.mirror(cut)
                cut = ImageEnhance.Brightness(cut).enhance(rng.uniform(0.8, 1.2))
                cut.save(folder / f"{cls}-{split}-{i:03d}.jpg", "JPEG", quality=90)
    Image.new("P", (300, 300), 7).save(root / "train" / "ants" / "imageNotFound.gif")  # as hymenoptera has one
    return root


def hymenoptera_subset(hymenoptera: Path, root: Path, train: int, val: int) -> Path:
    """root/{train,val}/{ants,bees}/: the first `train` / `val` photos of each class, copied (sorted by name)."""
    for split, n in (("train", train), ("val", val)):
        for cls in ("ants", "bees"):
            (root / split / cls).mkdir(parents=True)
            for src in sorted((hymenoptera / split / cls).glob("*.jpg"))[:n]:
                shutil.copy(src, root / split / cls / src.name)
    return root


def shadowing_packages(root: Path) -> Path:
    """A user's project folder with its own top-level `models`, `service` and `training` packages, each of
    which stops the process if imported."""
    for name in ("models", "service", "training"):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "__init__.py").write_text(f"raise SystemExit('the user project\\'s {name} was imported')\n")
    return root


def inference_batches(metrics_text: str) -> tuple[int, int]:
    """(onnxruntime calls, of which single-image ones), from the service's Prometheus histogram."""
    sizes = read_batch_sizes(metrics_text)
    return int(sizes.get("count", 0)), int(sizes.get("le_1.0", 0))


# --- distributed ranks ------------------------------------------------------------------------------------------

def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest |a - b| over the floating-point tensors of `b`, in float64."""
    return max((a[k].double() - b[k].double()).abs().max().item() for k in b if b[k].is_floating_point())


def cli_flags(settings: dict[str, Any]) -> list[str]:
    """TrainConfig keyword arguments as `tuneserve train` flags: {"head_epochs": 1} -> ["--head-epochs=1"]."""
    return [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]


class Ranks:
    """`world_size` rank processes kept for a test module: `ranks.run(fn, *args)` calls `fn(rank, world_size,
    port, *args)` on every rank with a fresh port, as `torch.multiprocessing.spawn` would, without starting new
    processes each time (each imports torch and tuneserve: ~4 s of CPU, twice per spawn). A rank that fails,
    dies or outlives the timeout stops them all (the others may be waiting for it in a collective) and fails
    the call with its traceback; the next call starts fresh processes."""

    def __init__(self, world_size: int = 2):
        self.world_size = world_size
        self._ranks: list[tuple[Any, Any]] = []  # (process, connection)

    def run(self, fn, *args: Any, timeout: float = 300.0) -> None:
        if not self._ranks:
            ctx = torch_mp.get_context("spawn")
            for _ in range(self.world_size):
                ours, theirs = ctx.Pipe()
                process = ctx.Process(target=_rank_loop, args=(theirs,))  # not daemonic: ranks may start workers
                process.start()
                theirs.close()
                self._ranks.append((process, ours))
        port = free_port()
        for rank, (_, conn) in enumerate(self._ranks):
            conn.send((fn, (rank, self.world_size, port, *args)))
        waiting = {conn: rank for rank, (_, conn) in enumerate(self._ranks)}
        deadline = time.monotonic() + timeout
        try:
            while waiting:
                ready = mp_connection.wait(list(waiting), max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise AssertionError(f"ranks {sorted(waiting.values())} still running after {timeout:.0f} s")
                for conn in ready:
                    rank = waiting.pop(conn)
                    try:
                        error = conn.recv()
                    except EOFError:
                        error = "the process died (its stderr is above)"
                    if error is not None:
                        raise AssertionError(f"rank {rank} of {self.world_size} failed:\n{error}")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for process, conn in self._ranks:
            conn.close()
            process.kill()
            process.join(10)
        self._ranks = []


def _rank_loop(conn) -> None:
    """A rank process: run each (fn, args) received, answer None or the traceback; stop when the pipe closes."""
    while True:
        try:
            fn, args = conn.recv()
        except EOFError:
            return
        try:
            fn(*args)
            conn.send(None)
        except BaseException:  # noqa: BLE001 - the test reports it
            conn.send(traceback.format_exc())


ARCH = "efficientnet_lite0"  # the default architecture, with its real (offline) ImageNet weights
# Eval preprocessing (resize, centre crop, normalise) at 64 px: no random augmentation, and fast on 2 cores.
SMALL = Preprocessing(input_size=64, resize_size=64)


def join(rank: int, world_size: int, port: int, local_world_size: int | None = None) -> None:
    """torchrun's environment for this rank; `setup()` (or `train()`) then builds the gloo group from it."""
    faulthandler.enable()  # a rank that dies in native code (SIGABRT, SIGSEGV) prints where, in the test's stderr
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(local_world_size or world_size))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # not whatever the hostname resolves to
    torch.set_num_threads(1)  # 2 ranks on 2 cores


# --- exact equivalence: W ranks x batch B == 1 process x batch W*B --------------------------------------------

class Float64(EvalTransform):
    def __call__(self, img) -> torch.Tensor:
        return super().__call__(img).double()  # float64 (3, S, S)


def equivalence_steps(env: DistEnv, samples: list[Sample], batch: int, accum: int, bn: str,
                      shard: bool = False) -> dict[str, torch.Tensor]:
    """K optimizer steps of the real full-phase step (train_one_epoch, AdamW param groups, warm-up + cosine
    schedule, label smoothing, gradient clipping) from the same initial weights; returns the final parameters.

    Sharding: rank r's j-th image is the (r + W*j)-th (DistributedSampler, shuffle off), so step k on W ranks
    sees exactly the images of the single process's k-th batch of W*B*accum (sequential sampler).

    bn="frozen": BatchNorm layers in eval mode (running statistics, affine weights still trained), which makes
    each image's forward independent of the batch it sits in, so the split over ranks changes nothing.
    Train-mode BN normalises by the statistics of each rank's B images, which differ from those of W*B images;
    SyncBatchNorm would fix that, but torch runs it on CUDA only. bn="train" is the control that shows this.

    float64 weights and images: in float32, the different summation order (6 images vs 3 + 3 and an all-reduce)
    flips the sign of gradient elements that are ~0, and AdamW turns each such flip into a full +-lr step
    (~2e-4 apart after 3 steps). In float64 the two runs agree to ~1e-15. The loss itself stays float32
    (train_one_epoch casts the logits), which is exact here: fl(x/6) == fl(x/3)/2.

    shard=True: FSDP2 (`--shard fsdp`) instead of DDP; the parameters returned are the full, gathered ones.
    """
    from tuneserve.training.sharding import shard_model
    from tuneserve.training.train import _param_groups, _prepare_phase

    cfg = TrainConfig(lr=1e-3, weight_decay=0.05, label_smoothing=0.1, grad_clip=1.0, warmup_epochs=0.5)
    torch.manual_seed(0)  # the fresh 3-way head: same initial weights in every process
    model = build_model(ARCH, 3, "imagenet").double()
    if shard:
        shard_model(model, env)  # in place: new (DTensor) parameters, before their ids and the optimizer
    head = {id(p) for p in head_parameters(model, ARCH)}
    dataset = ImageDataset(samples, SMALL, Float64(SMALL))
    if env.distributed:
        sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=False)
        loader = DataLoader(dataset, batch_size=batch, sampler=sampler)
    else:
        loader = DataLoader(dataset, batch_size=batch, shuffle=False)
    steps = len(loader) // accum
    assert steps * accum == len(loader) and len(dataset) == steps * accum * batch * env.world_size, "no ragged tail"
    optimizer = torch.optim.AdamW(_param_groups(model, head, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        fixed_factor, steps_per_epoch=steps, head_epochs=0, epochs=1, warmup_epochs=cfg.warmup_epochs))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)  # a mean over the local batch
    ddp_model = _prepare_phase(model, head, "full", env)
    model.train()
    if bn == "frozen":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    train_one_epoch(ddp_model, loader, optimizer, scheduler, scaler, criterion, env, None, False, accum,
                    cfg.grad_clip, desc="equivalence")
    # buffers: rank 0's are broadcast anyway; full_tensor() is collective (every rank gathers the whole)
    return {k: (p.full_tensor() if shard else p).detach().clone() for k, p in model.named_parameters()}


def equivalence_rank(rank: int, world_size: int, port: int, samples: list[Sample], runs: list[dict[str, Any]],
                     out: str) -> None:
    join(rank, world_size, port)
    env = setup("cpu")
    try:
        results = [equivalence_steps(env, samples[: run["images"]], run["batch"], run["accum"], run["bn"]) for run in runs]
    finally:
        cleanup(env)
    torch.save(results, Path(out) / f"rank{rank}.pt")


# --- --shard fsdp: exact steps and full-state checkpoints -------------------------------------------------------

def fsdp_equivalence_rank(rank: int, world_size: int, port: int, samples: list[Sample], run: dict[str, Any],
                          out: str) -> None:
    join(rank, world_size, port)
    env = setup("cpu")
    try:
        result = equivalence_steps(env, samples[: run["images"]], run["batch"], run["accum"], "frozen", shard=True)
    finally:
        cleanup(env)
    torch.save(result, Path(out) / f"rank{rank}.pt")


def sharded_trainables(env: DistEnv, seed: int):
    """FullStateTrainables of a sharded efficientnet_lite0 (random weights, seeded per call) with an EMA."""
    from tuneserve.training.ema import make_ema
    from tuneserve.training.sharding import FullStateTrainables, shard_model

    torch.manual_seed(seed)
    model = build_model(ARCH, 3, "none")
    ema = make_ema(model, 0.5)
    shard_model(model, env)
    shard_model(ema.module, env)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return FullStateTrainables(model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), ema)


def sharded_checkpoint_rank(rank: int, world_size: int, port: int, out: str) -> None:
    """Two real steps (clipped, EMA updated, the stem frozen) on a sharded model, its full state gathered (rank 0
    writes it), then loaded by every rank into a fresh sharded model from other random weights (nothing frozen,
    as when a run resumes), and gathered again."""
    from tuneserve.training.sharding import update_ema

    join(rank, world_size, port)
    env = setup("cpu")
    try:
        t = sharded_trainables(env, seed=rank)  # ranks start from different weights: rank 0's must win
        t.model.conv_stem.requires_grad_(False)  # frozen, as the backbone in the head phase: no AdamW state
        x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(rank))
        for _ in range(2):
            t.model(x).logsumexp(1).mean().backward()
            torch.nn.utils.clip_grad_norm_(list(t.model.parameters()), 0.1)
            t.optimizer.step()
            update_ema(t.ema, t.model)
            t.optimizer.zero_grad(set_to_none=True)
        t.gather()
        if rank == 0:
            torch.save({**t.weights(), **t.state()}, Path(out) / "saved.pt")
        torch.distributed.barrier()
        fresh = sharded_trainables(env, seed=100 + rank)
        fresh.load(torch.load(Path(out) / "saved.pt", weights_only=True))
        fresh.gather()
        if rank == 0:
            torch.save({**fresh.weights(), **fresh.state()}, Path(out) / "reloaded.pt")
        torch.save({"n_averaged": int(fresh.ema.n_averaged)}, Path(out) / f"rank{rank}.pt")
    finally:
        cleanup(env)


# --- local SGD inside the real train() -------------------------------------------------------------------------

def sample_params(model: nn.Module) -> torch.Tensor:
    """The first 64 values of every parameter tensor: every layer is represented, in ~10k floats per snapshot."""
    return torch.cat([p.detach().flatten()[:64] for p in model.parameters()]).clone()


def train_rank(rank: int, world_size: int, port: int, cfg: dict[str, Any]) -> None:
    """`train()` on this rank, as `torchrun ... tuneserve train` runs it."""
    from tuneserve.training.train import train

    join(rank, world_size, port)
    train(TrainConfig(**cfg))


def local_sgd_rank(rank: int, world_size: int, port: int, cfg: dict[str, Any], local_world_size: int, out: str) -> None:
    """Run `train()` unchanged, with spies (not mocks) on the loop functions it calls: a snapshot of the
    parameters after every optimizer step (after the local SGD averager ran), and of the model evaluated."""
    import tuneserve.training.train as tt

    join(rank, world_size, port, local_world_size)
    steps: list[torch.Tensor] = []
    evals: list[torch.Tensor] = []
    real_epoch, real_evaluate = tt.train_one_epoch, tt.evaluate

    def epoch_spy(model, *args, after_step=None, **kwargs):
        module = model.module if hasattr(model, "module") else model

        def record() -> None:
            if after_step is not None:
                after_step()
            steps.append(sample_params(module))

        return real_epoch(model, *args, after_step=record, **kwargs)

    def evaluate_spy(model, *args, **kwargs):
        evals.append(sample_params(model))
        return real_evaluate(model, *args, **kwargs)

    tt.train_one_epoch, tt.evaluate = epoch_spy, evaluate_spy
    try:
        tt.train(TrainConfig(**cfg))
    finally:  # the process serves the next test's ranks too (Ranks)
        tt.train_one_epoch, tt.evaluate = real_epoch, real_evaluate
    torch.save({"steps": steps, "evals": evals}, Path(out) / f"rank{rank}.pt")


# --- hostile payloads ---------------------------------------------------------------------------------------------

def wide_grey_png(side: int = 6300) -> bytes:
    """A few-kB PNG of side x side 16-bit grey pixels (40 Mpx at 6300): cheap to send, costly to decode."""
    return encode(Image.fromarray(np.full((side, side), 1000, dtype=np.uint16)), "PNG", optimize=True)


def forged_size_jpeg(jpeg: bytes, width: int = 6300, height: int = 6300) -> bytes:
    """A real JPEG whose frame header claims `width` x `height`: far less data than such an image needs."""
    data = bytearray(jpeg)
    sof = next(i for i in range(2, len(data) - 9) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1, 0xC2))
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


# --- a worker without a server ------------------------------------------------------------------------------------

class RecordingMetrics:
    """The service's metrics (service/engine/metrics.py), kept in lists for tests to read."""

    def __init__(self) -> None:
        self.batches: list[int] = []  # images per onnxruntime call
        self.requests: list[tuple[str, str, int]] = []  # (model, version, status)
        self.failed_loads: list[str] = []

    def request(self, model: str, version: str, status: int, seconds: float) -> None:
        self.requests.append((model, version, status))

    def engine_wait(self, model: str, version: str, seconds: float) -> None:
        pass

    def batch(self, model: str, version: str, images: int, seconds: float) -> None:
        self.batches.append(images)

    def load_failed(self, model: str) -> None:
        self.failed_loads.append(model)


def make_engine(metrics=None, **settings):
    """An Engine (service/engine/engine.py) serving what `settings` (ServiceConfig fields) say."""
    from tuneserve.service.config import ServiceConfig
    from tuneserve.service.engine.engine import Engine
    from tuneserve.service.plan import ServingPlan

    return Engine(ServingPlan.resolve(ServiceConfig(**settings)), metrics)


@contextlib.contextmanager
def routes_client(engine, **settings):
    """An engine built from `settings` (make_engine) behind the real routes, in-process (Starlette's
    TestClient, server errors answered rather than raised): (client, engine); the engine is closed after."""
    from starlette.testclient import TestClient

    from tuneserve.service.edges.routes import create_app

    engine = engine if engine is not None else make_engine(**settings)
    try:
        with TestClient(create_app(lambda: engine), raise_server_exceptions=False) as client:
            yield client, engine
    finally:
        engine.close()


def front_app(engine, api_key: str | None = None, admin_key: str | None = None):
    """The routes behind the service's front middleware (keys, probes, JSON errors), as service/service.py
    stacks them, for in-process tests."""
    from tuneserve.service.edges.front import Keys
    from tuneserve.service.edges.front import Front
    from tuneserve.service.edges.route_table import RouteTable
    from tuneserve.service.edges.routes import create_app

    management = admin_key is not None
    return Front(create_app(lambda: engine, management=management), table=RouteTable(management=management),
                 keys=Keys(api_key, admin_key), health=lambda: {"workers": {"alive": 1, "expected": 1}, "live": True},
                 model=lambda: engine.plan.model.tag)


def assert_classification_extension(top, reference, labels: list[str]) -> None:
    """Triton's classification extension answer `top` (BYTES (N, k) of "score:index:label", best first) says
    what the probabilities `reference` (N, classes) do: the best class's index, label and score (within 1e-6)."""
    for row, want in zip(top, reference):
        score, index, label = row[0].decode().split(":", 2)
        assert int(index) == want.argmax() and label == labels[want.argmax()]
        assert abs(float(score) - want.max()) <= 1e-6
