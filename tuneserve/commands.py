"""The `tuneserve` subcommands: each takes the parsed arguments and returns the exit code.

They print for the user (stdout: results; stderr: errors) and leave the work to the packages: training,
export and evaluation to tuneserve.training, the store to tuneserve.models, serving to tuneserve.service.
Heavy imports (torch, bentoml) happen inside each command, so that `tuneserve --help` is instant.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from tuneserve.table import format_table, predictions_table

log = logging.getLogger("tuneserve")

EXIT_OK = 0
EXIT_FAILURE = 1  # the job failed: a server error, no service at the URL, the parity gate, a failed image
EXIT_USAGE = 2  # bad arguments or input: the user can fix them


def cmd_train(args: argparse.Namespace) -> int:
    from tuneserve.launch import check_gpus, torchrun_command
    from tuneserve.training.config import TrainConfig, make_config
    from tuneserve.training.train import train

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    cfg = make_config(args.config, **overrides)
    if not cfg.data and not cfg.resume:
        raise ValueError("--data DIR is required (a folder of class subfolders, or with train/ and val/)")
    if args.gpus is not None:
        check_gpus(args.gpus, cfg.device)
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
        return EXIT_OK  # under torchrun, rank 0 reports for everyone
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
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from tuneserve.training.export import export_run

    stored = export_run(args.checkpoint, name=args.name, data=args.data, exporter=args.exporter)
    parity = stored.card.parity
    print(f"model: {stored.tag}  ({stored.path})")
    print(f"parity: max |logit diff| {parity['max_abs_logit_diff']:.2e}, top-1 agreement "
          f"{parity['top1_agreement']:.0%} on {parity['images']} images")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tuneserve.models.store import load_model
    from tuneserve.training.evaluate import evaluate_stored

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    model = load_model(args.tag)
    m = evaluate_stored(model, args.data, args.batch_size, args.device)
    if args.json:
        print(json.dumps(m, indent=1))
        return EXIT_OK
    print(f"{model.tag} on {args.data}: {m['images']} images ({m['skipped']} skipped), {m['provider']}")
    print(f"top-1 {m['top1']:.2%}" + (f"  top-5 {m['top5']:.2%}" if "top5" in m else "")
          + f"  macro-F1 {m['macro_f1']:.3f}  loss {m['loss']:.4f}")
    rows = [(c, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", v["support"])
            for c, v in m["per_class"].items() if v["support"] > 0]
    print(format_table(("CLASS", "PRECISION", "RECALL", "F1", "SUPPORT"), rows, right=(1, 2, 3, 4)))
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    if args.models_command == "add-builtin":
        from tuneserve.training.builtin import ensure_builtin_model

        model = ensure_builtin_model()
        print(f"model: {model.tag}  ({model.path})")
        return EXIT_OK
    if args.models_command == "prune":
        return _prune(args.dry_run)
    if args.models_command in ("load", "unload", "rollback"):
        return _manage(args)
    from tuneserve.models.store import list_models

    found = list_models()
    if args.json:
        print(json.dumps([{"tag": s.tag, "arch": s.card.arch, "labels": s.card.labels, "metrics": {
            k: v for k, v in s.card.metrics.items() if not isinstance(v, (dict, list))}, "created": s.creation_time,
            "parent": s.card.parent, "data_fingerprint": s.card.data_fingerprint, "path": str(s.path)}
            for s in found], indent=1))
        return EXIT_OK
    if not found:
        print("no tuneserve models yet: run `tuneserve train --data DIR` or `tuneserve models add-builtin`")
        return EXIT_OK
    rows = [(s.tag, s.card.arch, s.card.num_classes, _top1(s.card.metrics), s.creation_time[:19], s.card.parent or "-")
            for s in found]
    print(format_table(("TAG", "ARCH", "CLASSES", "VAL TOP-1", "CREATED", "CONTINUED FROM"), rows, right=(2, 3)))
    return EXIT_OK


def _prune(dry_run: bool) -> int:
    from tuneserve.models.store import prune

    removed = prune(dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for what, why in removed:
        print(f"{verb} {what}: {why}")
    if not removed:
        print("nothing to remove: every version in the store is complete")
    return EXIT_OK


def _manage(args: argparse.Namespace) -> int:
    from tuneserve.client import ServiceClient

    with ServiceClient(args.url, admin_key=args.admin_key) as client:
        answer = client.manage(args.models_command, args.name, getattr(args, "version", None))
    if not answer.ok:
        print(f"error: {answer.body.get('error', '')} (HTTP {answer.status})", file=sys.stderr)
        return EXIT_FAILURE
    body = answer.body
    state = "unloaded" if body.get("unloaded") else f"serving version {body.get('version')}"
    print(f"{args.name}: {state} on {body.get('workers', '?')} worker(s) at {client.url}")
    return EXIT_OK


def _top1(metrics: dict[str, Any]) -> str:
    return f"{metrics['val_top1']:.2%}" if "val_top1" in metrics else "-"


def cmd_serve(args: argparse.Namespace) -> int:
    from tuneserve.service.config import ServiceConfig, check_exposure
    from tuneserve.service.plan import ServingPlan
    from tuneserve.service.process import serve_command

    # Loopback by default, as TorchServe binds: a server reachable from elsewhere is a choice (with a key).
    host = args.host or os.environ.get("BENTOML_HOST") or "127.0.0.1"
    port = _port(args.port)
    flags = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(ServiceConfig)}
    flags["models"] = ",".join(flags["models"]) if flags["models"] else None  # --model a --model b
    # Flags over TUNESERVE_* variables over defaults; bad values fail here, once, not in every worker.
    cfg = dataclasses.replace(ServiceConfig.from_env(), **{k: v for k, v in flags.items() if v is not None})
    cfg.key("api"), cfg.key("admin")  # an unreadable key file is an error now, not in every worker
    check_exposure(cfg, host)
    if not cfg.model_tags():
        from tuneserve.training.builtin import ensure_builtin_model

        ensure_builtin_model()  # registered on first use; the service only loads tags
    # The plan, once: an unknown tag, a damaged file or a graph that does not load is one readable error now,
    # and the workers serve exactly the checked versions and settings (TUNESERVE_PLAN).
    plan = ServingPlan.resolve(cfg)
    plan.check()
    env = {**os.environ, **plan.to_env()}
    print(f"serving {', '.join(m.tag for m in plan.models)} on http://{host}:{port}  (POST /classify, "
          f"POST /models/NAME/classify, GET /models, docs at /)"
          + (f"; Open Inference Protocol over gRPC on {host}:{cfg.grpc_port}" if cfg.grpc_port else ""), flush=True)
    # exec: `tuneserve serve` becomes `bentoml serve`, so Ctrl-C, SIGTERM and the exit code are bentoml's own.
    cmd = serve_command(host, port)
    os.execve(cmd[0], cmd, env)
    return EXIT_OK  # not reached


def _port(flag: int | None) -> int:
    raw, source = (flag, "--port") if flag is not None else (os.environ.get("BENTOML_PORT") or "3000", "BENTOML_PORT")
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"{source}={raw!r} is not a port number (1..65535)") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{source} must be in 1..65535, got {port}")
    return port


def cmd_predict(args: argparse.Namespace) -> int:
    from tuneserve.client import ServiceClient

    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    paths = [Path(p) for p in args.images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no such image file: {', '.join(missing)}")
    with ServiceClient(args.url, api_key=args.api_key) as client:
        ask = client.explain if args.explain else client.classify
        answers = [(path, ask(path.read_bytes(), args.top_k, args.model)) for path in paths]
    failed = [(p, a) for p, a in answers if not a.ok]
    written = _write_overlays([(p, a) for p, a in answers if a.ok], Path(args.output_dir)) if args.explain else []
    if args.json:
        print(json.dumps([{"image": str(p), **_without_pictures(a.body)} if a.ok else
                          {"image": str(p), "error": a.body.get("error", ""), "status": a.status} for p, a in answers],
                         indent=1))
    else:
        for p, a in failed:
            print(f"error: {p}: {a.body.get('error', '')} (HTTP {a.status})", file=sys.stderr)
        good = [(p, a) for p, a in answers if a.ok]
        if good:
            print(f"model {good[0][1].body['model']} at {client.url}")
            print(predictions_table([(p.name, a.body["predictions"]) for p, a in good]))
        for path in written:
            print(f"wrote {path}")
    return EXIT_FAILURE if failed else EXIT_OK


def _write_overlays(answers: list[tuple[Path, Any]], out_dir: Path) -> list[Path]:
    """Each prediction's overlay (base64 PNG in the explain answer) as OUT_DIR/<image stem>.<label>.explain.png."""
    import base64
    import re

    written = []
    for image, answer in answers:
        out_dir.mkdir(parents=True, exist_ok=True)
        for prediction in answer.body["predictions"]:
            label = re.sub(r"[^\w.-]+", "_", prediction["label"]).strip("_") or "label"  # a safe file name part
            path = out_dir / f"{image.stem}.{label}.explain.png"
            path.write_bytes(base64.b64decode(prediction["overlay_png"]))
            written.append(path)
    return written


def _without_pictures(body: dict[str, Any]) -> dict[str, Any]:
    """An explain answer for printing: the overlays are files already, and base64 PNGs bury the scores."""
    return {**body, "predictions": [{k: v for k, v in p.items() if k != "overlay_png"} for p in body["predictions"]]}


def cmd_inspect(args: argparse.Namespace) -> int:
    from tuneserve.training.diagnostics import inspect_folder

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    found = inspect_folder(args.data, args.model, args.output_dir, args.device, args.batch_size)
    issues = found["issues"]
    print(f"{found['photos']} photos ({found['skipped']} unreadable, skipped), features of {found['model']}: "
          f"{len(issues)} likely mislabelled")
    rows = [(Path(i.path).name, i.given_label, i.suggested_label, f"{i.score:.3f}") for i in issues[:10]]
    if rows:
        print(format_table(("PHOTO", "GIVEN", "SUGGESTED", "LABEL QUALITY"), rows, right=(3,)))
    for path in found["files"]:
        print(f"wrote {path}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from tuneserve.client import ServiceClient
    from tuneserve.models.samples import sample_photos
    from tuneserve.service.process import ServerFailed, running_server
    from tuneserve.training.builtin import ensure_builtin_model

    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    model = ensure_builtin_model()
    photos = sample_photos()
    if not photos:
        raise FileNotFoundError("no sample photos found (they ship with scikit-image and matplotlib)")
    print(f"starting the service (bentoml serve) with {model.tag} ...", flush=True)
    with running_server(env={"TUNESERVE_MODEL": model.tag}) as url, ServiceClient(url) as client:
        info = client.model().body
        rows = []
        for path in photos:
            answer = client.classify(path.read_bytes(), args.top_k)
            if not answer.ok:
                raise ServerFailed(f"the service answered {path.name} with HTTP {answer.status}: {answer.body}")
            rows.append((path.name, answer.body["predictions"]))
        # Where the model looked, for the first photo: its best class's activation map over the photo.
        explained = client.explain(photos[0].read_bytes(), 1)
        written = _write_overlays([(photos[0], explained)], Path(args.output_dir)) if explained.ok else []
    print(f"model {info['tag']} served at {url} by onnxruntime on {info['runtime']['provider']}")
    print(predictions_table(rows))
    for path in written:
        print(f"\nwhere the model looked in {photos[0].name}: {path}  (POST /explain, tuneserve predict --explain)")
    print("\nserver stopped. Serve it yourself with `tuneserve serve`, then `tuneserve predict IMAGE...` "
          "(or see docs/serving.md for curl and Python).")
    return EXIT_OK


COMMANDS = {"train": cmd_train, "export": cmd_export, "evaluate": cmd_evaluate, "models": cmd_models,
            "serve": cmd_serve, "predict": cmd_predict, "demo": cmd_demo, "inspect": cmd_inspect}
