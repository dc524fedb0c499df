"""The `tuneserve` argument parsers. `train` and `serve` flags are generated from their config dataclasses
(TrainConfig, ServiceConfig): one flag per field, with the field's help, type and choices, so a setting
cannot exist in one place and be missing from the other. Nothing heavy is imported here: `--help` is instant.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from tuneserve import __version__

TOP_K_HELP = "predictions per image (default: %(default)s)"


def add_dataclass_flags(p: argparse.ArgumentParser, cls: type, describe_default) -> None:
    """One `--field-name` per dataclass field; every default is None, so that what the user did not set can
    come from elsewhere (a config file, the environment). `describe_default(field)` words the real default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("secret"):
            continue  # keys belong in the environment or a file, not on a command line `ps` shows
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        flags = [flag, *f.metadata.get("aliases", ())]  # e.g. timm's names for the same setting
        base = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
        choices = f.metadata.get("choices")
        help_text = f"{f.metadata['help']}{describe_default(f)}".replace("%", "%%")
        if f.metadata.get("repeat"):
            p.add_argument(*flags, dest=f.name, action="append", default=None, metavar="TAG",
                           help=help_text + "; repeat the flag for several")
        elif base is bool:
            p.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            p.add_argument(*flags, dest=f.name, type=base, default=None, choices=choices, help=help_text,
                           metavar=None if choices else f.name.upper())


def _train_default(f: dataclasses.Field) -> str:
    if "default" in f.metadata["help"] or f.default in (None, ""):
        return ""  # the help text already says what happens when it is not set
    return f" (default: {f.default})"


def _serve_default(f: dataclasses.Field) -> str:
    shown = "" if "default" in f.metadata["help"] or f.default is None else f"; default: {f.default}"
    return f" (env {f.metadata['env']}{shown})"


def build_parser() -> argparse.ArgumentParser:
    from tuneserve.service.config import ServiceConfig
    from tuneserve.training.config import TrainConfig

    parser = argparse.ArgumentParser(
        prog="tuneserve", description="Fine-tune pretrained CNNs, export them to ONNX, serve them GPU-batched over HTTP.")
    parser.add_argument("--version", action="version", version=f"tuneserve {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune a pretrained CNN on an image folder, export to ONNX, register it")
    add_dataclass_flags(p, TrainConfig, _train_default)
    p.add_argument("--config", default=None, metavar="FILE", help="YAML/TOML/JSON file with the same keys as these flags")
    # Not a TrainConfig field: it picks how to launch, and the ranks it launches must not see it.
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="train on N CUDA GPUs: relaunches this command under torchrun (--standalone, one process "
                        "per GPU); for several nodes or CPU ranks run torchrun yourself (docs/training.md)")

    p = sub.add_parser("export", help="export a training checkpoint to ONNX (parity-gated) and register it")
    p.add_argument("checkpoint", help="best.pt / last.pt, or a run folder (uses its best.pt)")
    p.add_argument("--name", help="model name in the store (default: the run's)")
    p.add_argument("--data", help="labelled folder whose validation images feed the parity gate (default: the run's)")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                   help="torch.onnx exporter (default: %(default)s; torchscript is the older tracer)")

    p = sub.add_parser("evaluate", help="evaluate a registered model on a labelled image folder")
    p.add_argument("tag", help="model tag (name or name:version)")
    p.add_argument("--data", required=True, help="DIR/<class>/* (or DIR/val/<class>/*)")
    p.add_argument("--batch-size", type=int, default=32, help="images per onnxruntime call (default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="onnxruntime device (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the full metrics as JSON")

    _add_models_parser(sub)

    p = sub.add_parser(
        "serve", help="serve a registered model over HTTP (BentoML): POST /classify, /classify_batch, GET /model",
        description="Every setting can also come from its environment variable; flags win.")
    p.add_argument("--host", default=None, help="interface to listen on (default: $BENTOML_HOST or 127.0.0.1; another address needs TUNESERVE_API_KEY or --allow-no-key)")
    p.add_argument("--port", type=int, default=None, help="TCP port (default: $BENTOML_PORT or 3000)")
    add_dataclass_flags(p, ServiceConfig, _serve_default)

    p = sub.add_parser("predict", help="classify image files with a running service and print a table")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, WebP, GIF, BMP, TIFF)")
    p.add_argument("--url", default=None, help="service URL (default: $TUNESERVE_URL or http://127.0.0.1:3000)")
    p.add_argument("--top-k", type=int, default=3, help=TOP_K_HELP)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per image: the service's answer, or its error and HTTP status")
    p.add_argument("--model", default=None, metavar="NAME", help="model to ask (none: the model the service serves by default)")
    p.add_argument("--api-key", default=None, help="the service's API key (default: $TUNESERVE_API_KEY)")
    p.add_argument("--explain", action="store_true",
                   help="also ask where the model looked: writes IMAGE_STEM.LABEL.explain.png (the class's "
                        "activation map over the photo) for each prediction into --output-dir")
    p.add_argument("--output-dir", default=".", metavar="DIR",
                   help="where --explain writes its pictures (default: the current folder)")

    p = sub.add_parser("inspect", help="find photos whose label is likely wrong in a labelled folder, without "
                       "training: label_issues.csv and label_issues.png (cleanlab)")
    p.add_argument("data", metavar="DATA", help="DIR/<class>/* (or DIR/train/<class>/* + DIR/val/<class>/*, together)")
    p.add_argument("--model", default=None, metavar="TAG",
                   help="registered model whose features to use (its kept PyTorch weights; default: the built-in "
                        "ImageNet EfficientNet-Lite0); with the folder's classes, also top_losses.png")
    p.add_argument("--output-dir", default=".", metavar="DIR", help="where the files go (default: the current folder)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="PyTorch device for the features (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")

    p = sub.add_parser("demo", help="serve the built-in ImageNet model on a free port and classify real sample "
                       "photos over HTTP")
    p.add_argument("--top-k", type=int, default=3, help=TOP_K_HELP)
    p.add_argument("--output-dir", default="runs/demo", help="where the demo writes the picture of where the model "
                   "looked for its first photo (default: runs/demo)")
    return parser


def _add_models_parser(sub: Any) -> None:
    p = sub.add_parser("models", help="list the tuneserve models in the BentoML model store, or register the "
                       "built-in one")
    p.add_argument("--json", action="store_true", help="one JSON object per model instead of a table")
    actions = p.add_subparsers(dest="models_command", metavar="ACTION")
    q = actions.add_parser("list", help="the models, newest first (the default action)")
    # SUPPRESS: `models --json list` keeps the --json given before the action.
    q.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="one JSON object per model instead of a table")
    actions.add_parser("add-builtin", help="register the built-in ImageNet EfficientNet-Lite0 (exported from the "
                       "weights that ship with the package, offline), so `bentoml serve` and `bentoml build` find it")
    q = actions.add_parser("prune", help="remove what interrupted saves left: incomplete versions in the store and "
                           "staging folders of processes that are gone")
    q.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    for action, what in (("load", "serve NAME at a version (its newest without --version) on every worker"),
                         ("unload", "stop serving NAME"), ("rollback", "serve NAME's version before the current one")):
        q = actions.add_parser(action, help=f"{what}, through a running service's management API "
                               "(TUNESERVE_MODEL_CONTROL=explicit, TUNESERVE_ADMIN_KEY)")
        q.add_argument("name", help="model name")
        if action == "load":
            q.add_argument("--version", default=None, help="version to serve (default: the newest in the store)")
        q.add_argument("--url", default=None, help="service URL (default: $TUNESERVE_URL or http://127.0.0.1:3000)")
        q.add_argument("--admin-key", default=None, help="the service's admin key (default: $TUNESERVE_ADMIN_KEY)")
