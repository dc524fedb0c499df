"""Size and cold start of the serving image, built the way tests/test_container.py builds it (podman, local base).

    python benchmarks/container_image.py --out benchmarks/results/container.json

Builds the Bento from bentofile.yaml with only the base image swapped for a local Debian bookworm (this machine
cannot pull nvidia/cuda), containerizes it with podman and reports: the image's size, the base's size, the part
tuneserve adds (Python venv + Bento), the largest installed Python packages, the build's time (every layer built;
the wheels downloaded beforehand, not timed) and that of an image for another model version (the package layer
cached), and cold start (`podman run` to
the first 200 from /readyz, and to the first answered /classify) over --runs fresh containers, with the Kubernetes
Deployment's settings: once with the workers the service chooses for this machine's CPUs, and once, alternated,
with the Deployment's TUNESERVE_WORKERS (4: one per 2 of the 8 CPUs it requests beside a GPU), whose every worker
loads the service and the model at once, which a machine with fewer CPUs than that pays for.
Needs podman, runc, debootstrap (apt-get install podman runc debootstrap) and runs as root.
"""
from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import podman_image as cs  # the recipe tests/test_container.py builds and proves
from results_io import write_result
from shared_data import HYMENOPTERA, ROOT
from tuneserve.service.config import ServiceConfig
from tuneserve.service.process import free_port

PHOTO = HYMENOPTERA / "val" / "bees"


def image_bytes(image: str, env: dict[str, str]) -> int:
    out = subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", image], env=env,
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def largest_packages(image: str, env: dict[str, str], n: int = 6) -> list[tuple[str, int]]:
    code = ("import os, sys; root = [p for p in sys.path if p.endswith('site-packages')][0]; "
            "sizes = {d: sum(os.path.getsize(os.path.join(a, f)) for a, _, fs in os.walk(os.path.join(root, d)) "
            "for f in fs) for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))}; "
            "[print(d, s) for d, s in sorted(sizes.items(), key=lambda x: -x[1])[:%d]]" % n)
    out = subprocess.run(["podman", "run", "--rm", "--entrypoint", "python", image, "-c", code], env=env,
                         capture_output=True, text=True, check=True)
    return [(line.split()[0], int(line.split()[1])) for line in out.stdout.splitlines()]


def manifest_setting(name: str) -> int:
    """A literal environment value of the Deployment's container, as an int."""
    (container,) = cs.deployment_manifest()["spec"]["template"]["spec"]["containers"]
    return int(next(e["value"] for e in container["env"] if e["name"] == name))


def cold_start(image: str, env: dict[str, str], photo: bytes, workers: int | None = None) -> tuple[float, float]:
    """Seconds from `podman run` to /readyz 200, and to the first /classify answer. `workers` replaces the
    Deployment's TUNESERVE_WORKERS (None: keep it)."""
    name, port = f"tuneserve-bench-{uuid.uuid4().hex[:8]}", free_port()
    key = secrets.token_hex(16)
    flags = cs.podman_flags_like_kubernetes(cs.deployment_manifest(), {"tuneserve-keys": {"api-key": key}})
    if workers is not None:
        flags += ["-e", f"TUNESERVE_WORKERS={workers}"]  # the last -e of a name wins
    start = time.monotonic()
    try:
        subprocess.run(["podman", "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:3000", *flags, image],
                       env=env, check=True, capture_output=True)
        url = f"http://127.0.0.1:{port}"
        cs.wait_ready(url)
        ready = time.monotonic() - start
        req = urllib.request.Request(f"{url}/classify", data=photo, method="POST",
                                     headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
        return ready, time.monotonic() - start
    finally:
        subprocess.run(["podman", "rm", "-f", name], env=env, capture_output=True)


def rebuild_for_another_version(work: Path, bentofile: Path, uv_folder: Path) -> float:
    """Seconds to build the Bento and image of another version of the model (registered in a second store),
    the package layer of the first build cached: what a new fine-tune costs to ship."""
    home = work / "bentoml-next"
    env = {**cs.podman_env(work), "BENTOML_HOME": str(home)}
    cs.run([sys.executable, "-m", "tuneserve", "models", "add-builtin"], env=env)  # a new version, not timed
    (work / "next").mkdir()
    start = time.monotonic()
    bento = cs.build_bento(bentofile, env)
    image = f"localhost/tuneserve-bench:{uuid.uuid4().hex[:8]}"
    try:
        cs.containerize(bento, image, uv_folder, work / "next", env)
        return time.monotonic() - start
    finally:
        subprocess.run(["podman", "rmi", "-f", image], env=env, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="fresh containers started for the cold-start figure")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "container.json")
    args = ap.parse_args()
    if cs.missing_tools():
        sys.exit(f"error: needs {', '.join(cs.missing_tools())} (apt-get install podman runc debootstrap)")

    with tempfile.TemporaryDirectory(prefix="tuneserve-bench-") as tmp:
        work = Path(tmp)
        os.environ["BENTOML_HOME"] = str(work / "bentoml")
        from tuneserve.training.builtin import ensure_builtin_model

        model = ensure_builtin_model()
        env = {**cs.podman_env(work), "TUNESERVE_MODEL": model.tag}
        base = cs.ensure_base_image(env)
        bentofile = cs.bentofile_with_base(work, base)
        t0 = time.monotonic()
        bento = cs.build_bento(bentofile, env)
        bento_s = time.monotonic() - t0
        uv_folder = cs.offline_uv_config(Path(env["BENTOML_HOME"], "bentos", *bento.split(":")))  # not timed
        image = f"localhost/tuneserve-bench:{uuid.uuid4().hex[:8]}"
        t0 = time.monotonic()
        cs.containerize(bento, image, uv_folder, work, env, cache=False)  # every layer built afresh
        build_s = bento_s + time.monotonic() - t0
        rebuild_s = rebuild_for_another_version(work, bentofile, uv_folder)
        try:
            size, base_size = image_bytes(image, env), image_bytes(base, env)
            packages = largest_packages(image, env)
            photo = sorted(PHOTO.glob("*.jpg"))[0].read_bytes()
            here = ServiceConfig().worker_count("cpu")  # what the image chooses on this machine (no GPU here)
            manifest_workers = manifest_setting("TUNESERVE_WORKERS")
            starts, manifest_starts = [], []
            for _ in range(args.runs):  # alternated: the machine's drift reaches both alike
                starts.append(cold_start(image, env, photo, workers=here))
                manifest_starts.append(cold_start(image, env, photo))
        finally:
            subprocess.run(["podman", "rmi", "-f", image], env=env, capture_output=True)

    ready = [r for r, _ in starts]
    first = [f for _, f in starts]
    manifest_ready = [r for r, _ in manifest_starts]
    result = {
        "model": model.tag, "build_s_with_cached_base": round(build_s, 1),
        "rebuild_s_another_model_version": round(rebuild_s, 1),
        "image_mb": round(size / 1e6), "base_mb": round(base_size / 1e6), "added_mb": round((size - base_size) / 1e6),
        "largest_packages_mb": {name: round(b / 1e6) for name, b in packages},
        "ready_s": {"median": round(statistics.median(ready), 2), "max": round(max(ready), 2), "runs": len(ready)},
        "first_answer_s": {"median": round(statistics.median(first), 2), "max": round(max(first), 2)},
        "workers": here, "manifest_workers": manifest_workers,
        "ready_s_manifest_workers": {"median": round(statistics.median(manifest_ready), 2),
                                     "max": round(max(manifest_ready), 2), "runs": len(manifest_ready)},
    }
    write_result(args.out, **result)

    print(f"{'measure':34s} value")
    print(f"{'image size (local bookworm base)':34s} {result['image_mb']} MB")
    print(f"{'  of which base (Debian + Python)':34s} {result['base_mb']} MB")
    print(f"{'  added by tuneserve (venv + Bento)':34s} {result['added_mb']} MB")
    for name, mb in result["largest_packages_mb"].items():
        print(f"{'    ' + name:34s} {mb} MB")
    print(f"{'build (bento + image, base cached)':34s} {result['build_s_with_cached_base']} s")
    print(f"{'rebuild, another model version':34s} {result['rebuild_s_another_model_version']} s")
    print(f"{'cold start to /readyz 200':34s} median {result['ready_s']['median']} s, max {result['ready_s']['max']} s "
          f"({len(ready)} runs, {here} workers)")
    print(f"{'cold start to first /classify':34s} median {result['first_answer_s']['median']} s, max {result['first_answer_s']['max']} s")
    print(f"{'  with the Deployment workers':34s} median {result['ready_s_manifest_workers']['median']} s, max "
          f"{result['ready_s_manifest_workers']['max']} s ({manifest_workers} workers)")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
