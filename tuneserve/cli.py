"""`tuneserve` command line: train, export, evaluate, models, serve, predict, demo.

Every user mistake ends in one readable `error: ...` line and a non-zero exit, never a traceback.
Heavy imports (torch, bentoml) happen inside the subcommands so `tuneserve --help` is instant.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Any, Sequence

log = logging.getLogger("tuneserve")

EXIT_USAGE = 2  # bad arguments or input data: the user can fix it
EXIT_FAILURE = 1  # the job itself failed (e.g. the ONNX parity gate)
EXIT_INTERRUPTED = 130


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; defaults are None so that a --config file can fill them in."""
    import typing

    from training.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        base = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        if base is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            p.add_argument(flag, type=base, default=None, choices=f.metadata.get("choices"), help=help_text,
                           metavar=None if f.metadata.get("choices") else f.name.upper())
    p.add_argument("--config", default=None, metavar="FILE", help="YAML/TOML/JSON file with the same keys as these flags")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneserve", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune a pretrained CNN on an image folder, export to ONNX, register it")
    _add_train_flags(p)
    # Not a TrainConfig field: it picks how to launch, and the ranks it launches must not see it.
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="train on N CUDA GPUs: relaunches this command under torchrun (--standalone, one process "
                        "per GPU); for several nodes or CPU ranks run torchrun yourself (docs/training.md)")

    p = sub.add_parser("export", help="export a training checkpoint to ONNX (parity-gated) and register it")
    p.add_argument("checkpoint", help="best.pt / last.pt, or a run folder (uses its best.pt)")
    p.add_argument("--name", help="model name in the store (default: the run's)")
    p.add_argument("--data", help="labelled folder whose validation images feed the parity gate (default: the run's)")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")

    p = sub.add_parser("evaluate", help="evaluate a registered model on a labelled image folder")
    p.add_argument("tag", help="model tag (name or name:version)")
    p.add_argument("--data", required=True, help="DIR/<class>/* (or DIR/val/<class>/*)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--json", action="store_true", help="print the full metrics as JSON")

    p = sub.add_parser("models", help="list tuneserve models in the BentoML model store")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "serve", help="serve a registered model over HTTP (BentoML): POST /classify, /classify_batch, GET /model",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_serve_epilog())
    p.add_argument("--model", metavar="TAG", help="model tag, name or name:version (default: the built-in ImageNet "
                   "model, exported on first use)")
    p.add_argument("--host", default="0.0.0.0", help="interface to listen on (default: 0.0.0.0)")
    p.add_argument("--port", type=int, default=3000, help="TCP port (default: 3000)")
    p.add_argument("--workers", type=int, default=None, help="worker processes, each with its own model session and batcher (default: 1 on CPU; on CUDA one per 2 CPUs, at most 8)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default=None, help="onnxruntime device (default: auto)")
    p.add_argument("--precision", choices=("auto", "fp32", "fp16"), default=None,
                   help="auto (default): the model's fp16 variant on CUDA where export kept one, else fp32")
    p.add_argument("--max-batch-size", type=int, default=None, metavar="N",
                   help="most images per inference call; 1 turns batching off (default: measured per device)")
    p.add_argument("--max-latency-ms", type=int, default=None, metavar="MS",
                   help="requests whose images waited longer than this for the model are shed with 503")

    p = sub.add_parser("predict", help="classify image files with a running service and print a table")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, WebP, GIF, BMP, TIFF)")
    p.add_argument("--url", default=None, help="service URL (default: $TUNESERVE_URL or http://127.0.0.1:3000)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print the service's answers as JSON")

    p = sub.add_parser("demo", help="serve the built-in ImageNet model on a free port and classify real sample "
                       "photos over HTTP")
    p.add_argument("--top-k", type=int, default=3)
    return parser


def _serve_epilog() -> str:
    from service.config import describe_settings

    return "Every setting can also come from the environment (flags win):\n" + describe_settings()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    for noisy in ("bentoml", "httpx", "matplotlib", "PIL", "onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(COMMANDS[args.command](args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - mapped to readable messages below
        code = _user_error_code(e)
        if code is None or args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return code


def _user_error_code(e: Exception) -> int | None:
    from models.preprocessing import ImageDecodeError
    from models.store import ModelNotFoundError
    from models.weights import WeightsUnavailableError

    if isinstance(e, (ValueError, ModelNotFoundError, WeightsUnavailableError, ImageDecodeError, FileNotFoundError)):
        return EXIT_USAGE  # DataError and config errors are ValueErrors
    from training.export import ExportParityError

    if isinstance(e, ExportParityError):
        return EXIT_FAILURE
    from service.process import ServerFailed

    if isinstance(e, ServerFailed):
        return EXIT_FAILURE
    return None


def cmd_train(args: argparse.Namespace) -> int:
    from training.config import TrainConfig, make_config
    from training.train import train

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    cfg = make_config(args.config, **overrides)
    if not cfg.data and not cfg.resume:
        raise ValueError("--data DIR is required (a folder of class subfolders, or with train/ and val/)")
    if args.gpus is not None:
        _check_gpus(args.gpus, cfg.device)
        if args.gpus > 1:
            cmd = torchrun_command(args, args.gpus)
            log.info("launching %d ranks: %s", args.gpus, " ".join(cmd))
            sys.stdout.flush()
            sys.stderr.flush()
            # exec: torchrun replaces this process, so Ctrl-C, SIGTERM and the exit code are its own.
            os.execv(cmd[0], cmd)
        cfg = dataclasses.replace(cfg, device="cuda")  # --gpus 1: this process, on the one GPU
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 reports for everyone
    m = result.best_metrics
    print(f"\nrun folder:   {result.run_dir}  (checkpoints, history.csv, curves.png, confusion_matrix.png)")
    print(f"best epoch:   {result.best_epoch} of {len(result.history)}{' (stopped early)' if result.stopped_early else ''}")
    line = f"validation:   top-1 {m['top1']:.2%}"
    if "top5" in m:
        line += f", top-5 {m['top5']:.2%}"
    print(f"{line}, macro-F1 {m['macro_f1']:.3f}, loss {m['loss']:.4f} on {m['images']} images")
    if result.skipped:
        print(f"skipped:      {len(result.skipped)} unusable file(s), listed in the log above")
    if result.model is not None:
        print(f"model:        {result.model.tag}  ({result.model.path})")
        print(f"serve it:     tuneserve serve --model {result.model.tag}")
    return 0


def _check_gpus(n: int, device: str) -> None:
    import torch

    if n < 1:
        raise ValueError(f"--gpus must be >= 1, got {n}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        raise ValueError("--gpus launches torchrun itself; under torchrun, drop --gpus (torchrun already started the ranks)")
    if device == "cpu":
        raise ValueError(f"--gpus {n} runs one process per CUDA GPU, which contradicts --device cpu; for CPU ranks "
                         f"use: torchrun --nproc-per-node {n} -m tuneserve train ...")
    available = torch.cuda.device_count()
    if n > available:
        hint = f"; use --gpus 1..{available}" if available else " (no CUDA GPU, or a CPU-only torch build)"
        raise ValueError(f"--gpus {n} asks for {n} CUDA GPU(s), but torch sees {available}{hint}")


def torchrun_command(args: argparse.Namespace, n: int) -> list[str]:
    """`tuneserve train ... --gpus N` as `python -m torch.distributed.run --standalone --nproc-per-node N -m
    tuneserve train ...`, rebuilt from the parsed flags (so abbreviations and `--gpus` itself cannot leak)."""
    from training.config import TrainConfig

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m", "tuneserve"]
    if args.verbose:
        cmd.append("-v")
    cmd.append("train")
    if args.config is not None:
        cmd.append(f"--config={args.config}")
    for f in dataclasses.fields(TrainConfig):
        value = "cuda" if f.name == "device" else getattr(args, f.name)
        flag = "--" + f.name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            cmd.append(flag if value else "--no-" + flag[2:])
        else:
            cmd.append(f"{flag}={value}")  # '=' keeps values that start with '-' from reading as flags
    return cmd


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from training import checkpoint as ckpt_io
    from training.config import TrainConfig
    from training.data import discover
    from training.train import default_name, export_checkpoint

    path = Path(args.checkpoint)
    ckpt = ckpt_io.load(path / "best.pt" if path.is_dir() else path)
    cfg = TrainConfig(**{**ckpt["config"], **({"data": args.data} if args.data else {}), "exporter": args.exporter})
    ds = discover(cfg.data, cfg.manifest, cfg.val_fraction, cfg.seed, cfg.min_images_per_class)
    stored = export_checkpoint(Path(ckpt["path"]), args.name or cfg.name or default_name(cfg), ds, cfg)
    print(f"model: {stored.tag}  ({stored.path})")
    print(f"parity: max |logit diff| {stored.card.parity['max_abs_logit_diff']:.2e}, "
          f"top-1 agreement {stored.card.parity['top1_agreement']:.0%} on {stored.card.parity['images']} images")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from models.store import load_model
    from training.evaluate import evaluate_stored

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    model = load_model(args.tag)
    m = evaluate_stored(model, args.data, args.batch_size, args.device)
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    print(f"{model.tag} on {args.data}: {m['images']} images ({m['skipped']} skipped), {m['provider']}")
    print(f"top-1 {m['top1']:.2%}" + (f"  top-5 {m['top5']:.2%}" if "top5" in m else "") + f"  macro-F1 {m['macro_f1']:.3f}  loss {m['loss']:.4f}")
    rows = [(c, v) for c, v in m["per_class"].items() if v["support"] > 0]
    width = max(len(c) for c, _ in rows)
    print(f"{'class':<{width}}  precision  recall     f1  support")
    for c, v in rows:
        print(f"{c:<{width}}  {v['precision']:9.3f}  {v['recall']:6.3f}  {v['f1']:5.3f}  {v['support']:7d}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from models.store import list_models

    found = list_models()
    if args.json:
        print(json.dumps([{"tag": s.tag, "arch": s.card.arch, "labels": s.card.labels, "metrics": {
            k: v for k, v in s.card.metrics.items() if not isinstance(v, (dict, list))}, "created": s.creation_time,
            "path": str(s.path)} for s in found], indent=1))
        return 0
    if not found:
        print("no tuneserve models yet: run `tuneserve train --data DIR` or `tuneserve demo`")
        return 0
    rows = [(s.tag, s.card.arch, str(s.card.num_classes), _fmt_top1(s.card.metrics), s.creation_time[:19]) for s in found]
    header = ("TAG", "ARCH", "CLASSES", "VAL TOP-1", "CREATED")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0


def _fmt_top1(metrics: dict[str, Any]) -> str:
    return f"{metrics['val_top1']:.2%}" if "val_top1" in metrics else "-"


DEFAULT_URL = "http://127.0.0.1:3000"


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from models.store import load_model
    from service.config import ServiceConfig
    from service.process import serve_command

    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    flags = {"TUNESERVE_WORKERS": args.workers, "TUNESERVE_DEVICE": args.device, "TUNESERVE_PRECISION": args.precision,
             "TUNESERVE_MAX_BATCH_SIZE": args.max_batch_size, "TUNESERVE_MAX_LATENCY_MS": args.max_latency_ms}
    env = {**os.environ, **{k: str(v) for k, v in flags.items() if v is not None}}
    cfg = ServiceConfig.from_env(env)  # bad values fail here, naming the variable, not in every worker
    # Resolve the model here too, so that an unknown tag is one readable error before anything starts;
    # the workers get its exact name:version.
    if args.model or cfg.model:
        model = load_model(args.model or cfg.model)
    else:
        from training.builtin import ensure_builtin_model

        model = ensure_builtin_model()
    env["TUNESERVE_MODEL"] = model.tag
    print(f"serving {model.tag} on http://{args.host}:{args.port}  (POST /classify, POST /classify_batch, "
          f"GET /model, docs at /)", flush=True)
    # exec: `tuneserve serve` becomes `bentoml serve`, so Ctrl-C, SIGTERM and the exit code are bentoml's own.
    cmd = serve_command(args.host, args.port)
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


def cmd_predict(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    import httpx

    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    paths = [Path(p) for p in args.images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no such image file: {', '.join(missing)}")
    url = (args.url or os.environ.get("TUNESERVE_URL") or DEFAULT_URL).rstrip("/")
    answers, failed = [], 0
    with httpx.Client(base_url=url, timeout=120.0) as client:
        for path in paths:
            try:
                r = client.post("/classify", params={"top_k": args.top_k}, content=path.read_bytes(),
                                headers={"content-type": "application/octet-stream"})
            except httpx.TransportError as e:
                print(f"error: cannot reach the tuneserve service at {url} ({type(e).__name__}: {e}); start one "
                      "with `tuneserve serve` or pass --url", file=sys.stderr)
                return EXIT_USAGE
            answer = _answer_json(r)
            if r.status_code != 200:
                failed += 1
                print(f"error: {path}: {answer.get('error', r.text[:200])} (HTTP {r.status_code})", file=sys.stderr)
                continue
            answers.append((path, answer))
    if args.json:
        print(json.dumps([{"image": str(p), **a} for p, a in answers], indent=1))
    elif answers:
        print(f"model {answers[0][1]['model']} at {url}")
        _print_predictions([(p.name, a["predictions"]) for p, a in answers])
    return EXIT_USAGE if failed else 0


def _answer_json(r: Any) -> dict[str, Any]:
    try:
        body = r.json()
    except ValueError:
        return {"error": r.text[:200] or r.reason_phrase}
    return body if isinstance(body, dict) else {"error": str(body)[:200]}


def _print_predictions(rows: list[tuple[str, list[dict[str, Any]]]]) -> None:
    """One line per prediction: IMAGE  RANK  LABEL  SCORE, the image named on its first line only."""
    width = max(len("IMAGE"), *(len(name) for name, _ in rows))
    label_width = max(len("LABEL"), *(len(str(p["label"])) for _, preds in rows for p in preds))
    print(f"{'IMAGE':<{width}}  RANK  {'LABEL':<{label_width}}  SCORE")
    for name, preds in rows:
        for rank, p in enumerate(preds, 1):
            print(f"{name if rank == 1 else '':<{width}}  {rank:>4}  {p['label']:<{label_width}}  {p['score']:.3f}")


def cmd_demo(args: argparse.Namespace) -> int:
    import httpx

    from models.samples import sample_photos
    from service.process import running_server
    from training.builtin import ensure_builtin_model

    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    model = ensure_builtin_model()
    photos = sample_photos()
    if not photos:
        raise FileNotFoundError("no sample photos found (they ship with scikit-image and matplotlib)")
    print(f"starting the service (bentoml serve) with {model.tag} ...", flush=True)
    with running_server(env={"TUNESERVE_MODEL": model.tag}) as url:
        with httpx.Client(base_url=url, timeout=120.0) as client:
            info = client.get("/model").json()
            rows = []
            for path in photos:
                r = client.post("/classify", params={"top_k": args.top_k}, content=path.read_bytes())
                r.raise_for_status()
                rows.append((path.name, r.json()["predictions"]))
        print(f"model {info['tag']} served at {url} by onnxruntime on {info['runtime']['provider']}")
        _print_predictions(rows)
    print("\nserver stopped. Serve it yourself with `tuneserve serve`, then `tuneserve predict IMAGE...` "
          "(or see docs/serving.md for curl and Python).")
    return 0


COMMANDS = {"train": cmd_train, "export": cmd_export, "evaluate": cmd_evaluate, "models": cmd_models,
            "serve": cmd_serve, "predict": cmd_predict, "demo": cmd_demo}


if __name__ == "__main__":
    sys.exit(main())
