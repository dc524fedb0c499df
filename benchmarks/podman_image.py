"""Building and running the serving image with podman, offline: the recipe tests/test_container.py proves and
benchmarks/container_image.py measures.

What a machine with no Docker engine and no reachable registry needs:
- runc as the runtime, and containers started with lowered limits (inside an unprivileged container, runc's
  setrlimit refuses podman's defaults). A private containers.conf (CONTAINERS_CONF) sets both.
- Base images cannot be pulled: a Debian bookworm root filesystem is made with debootstrap and imported.
  It carries Python 3.11 (= bentofile's python_version, so uv finds it and downloads nothing) and uv (so
  BentoML's Dockerfile does not pip-install one).
- Python packages install offline: a wheelhouse is downloaded on the host (`pip download` of the Bento's
  requirements) and given to uv at build time through a volume at /etc/uv holding uv.toml
  (no-index + find-links), the system-wide config file uv reads. It is kept per requirements file in the user's
  cache (~15 s to download again).
- The image's package layer (~1 GB, ~25 s of a ~30 s build) is tagged PACKAGES_IMAGE after a build, so removing
  the image keeps it and the next build, for any model version, reuses it (deploy/Dockerfile.template installs
  the packages before the model's tags are set).
- `bentoml containerize` with a dockerfile_template rejects its own temporary build context unless that lies
  under the working directory (a BentoML bug in 1.4.36 to at least 1.4.40, bentoml/BentoML#5566), so it runs
  with TMPDIR inside its cwd.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
# Bump the suffix when the recipe below changes: an existing image of that name is reused (saves ~45 s locally).
BASE_IMAGE = "localhost/tuneserve-test-base:bookworm-1"
PACKAGES_IMAGE = "localhost/tuneserve-test-packages:latest"
WHEELHOUSES = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "tuneserve", "wheelhouses")
DEBIAN_MIRROR = os.environ.get("TUNESERVE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
"""
REQUIRED_TOOLS = ("podman", "runc", "debootstrap")


def missing_tools() -> list[str]:
    return [t for t in REQUIRED_TOOLS if shutil.which(t) is None]


def run(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 900,
        input: bytes | None = None) -> str:
    start = time.monotonic()
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, timeout=timeout, input=input)
    log.info("%s: %.1f s", " ".join(cmd[:4]), time.monotonic() - start)
    out, err = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:4])} ... exited {r.returncode}:\n{out[-3000:]}\n{err[-3000:]}")
    return out + err


def podman_env(workdir: Path) -> dict[str, str]:
    conf = workdir / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def ensure_base_image(env: dict[str, str]) -> str:
    """Debian bookworm (minbase) + Python 3.11 + venv + CA certificates + this environment's uv, as a podman image."""
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE], env=env).returncode == 0:
        return BASE_IMAGE
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        raise AssertionError("uv is not installed: it comes with the dev extra (pip install -e '.[dev]')")
    with tempfile.TemporaryDirectory(prefix="tuneserve-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm",
             str(rootfs), DEBIAN_MIRROR], timeout=900)
        shutil.copy2(uv, rootfs / "usr/local/bin/uv")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            r = subprocess.run(["podman", "import", "-", BASE_IMAGE], stdin=tar.stdout, env=env,
                               capture_output=True, timeout=600)
        finally:
            tar.stdout.close()
            tar.wait()
        if r.returncode != 0:
            raise AssertionError(f"podman import failed: {r.stderr.decode()[-2000:]}")
    return BASE_IMAGE


def bentofile_with_base(workdir: Path, base_image: str) -> Path:
    """The repository's bentofile.yaml with only docker.base_image swapped (the production file stays as is)."""
    text = (ROOT / "bentofile.yaml").read_text()
    lines = [f'  base_image: "{base_image}"' if line.strip().startswith("base_image:") else line
             for line in text.splitlines()]
    assert sum(line.startswith("  base_image:") for line in lines) == 1, "bentofile.yaml must set docker.base_image once"
    path = workdir / "bentofile.test.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def bentoml(*args: str, env: dict[str, str], cwd: Path = ROOT, timeout: float = 900) -> str:
    return run([sys.executable, "-m", "bentoml", *args], env=env, cwd=cwd, timeout=timeout)


def build_bento(bentofile: Path, env: dict[str, str]) -> str:
    out = bentoml("build", "-f", str(bentofile), "--output", "tag", env=env)
    return next(line.split("__tag__:")[1].strip() for line in out.splitlines() if "__tag__:" in line)


def offline_uv_config(bento_path: Path) -> Path:
    """A folder for /etc/uv at build time: uv.toml pointing uv at wheels downloaded here, and nothing else.

    Kept per requirements file (its hash names the folder); a download that fails leaves nothing behind."""
    requirements = bento_path / "env" / "python" / "requirements.txt"
    folder = WHEELHOUSES / hashlib.sha256(requirements.read_bytes()).hexdigest()[:16]
    if (folder / "uv.toml").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        partial = Path(tmp) / "wheelhouse"
        run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "-d", str(partial / "wheels"),
             "-r", str(requirements)], timeout=900)
        (partial / "uv.toml").write_text('no-index = true\nfind-links = ["/etc/uv/wheels"]\n')
        try:
            partial.rename(folder)
        except OSError:  # another process finished the same download first
            if not (folder / "uv.toml").exists():
                raise
    return folder


def containerize(bento_tag: str, image: str, uv_folder: Path, workdir: Path, env: dict[str, str],
                 cache: bool = True) -> str:
    """`bentoml containerize` with podman; then tags the image's package layer PACKAGES_IMAGE (module docstring).
    cache=False builds every layer afresh (a cold build's time)."""
    tmp = workdir / "build-tmp"  # under cwd, no dot in the path: BentoML #5566
    tmp.mkdir()
    out = bentoml("containerize", bento_tag, "--backend", "podman", "-t", image,
                  "--opt", f"volume={uv_folder}:/etc/uv:ro", *([] if cache else ["--opt", "no-cache"]),
                  env={**env, "TMPDIR": str(tmp)}, cwd=workdir)
    history = run(["podman", "history", "--no-trunc", "--format", "{{.ID}}\t{{.CreatedBy}}", image], env=env)
    layer = next((line.split("\t")[0] for line in history.splitlines() if "env/python/install.sh" in line), None)
    if layer and layer != "<missing>":
        before = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", PACKAGES_IMAGE], env=env,
                                capture_output=True, text=True).stdout.strip()
        run(["podman", "tag", layer, PACKAGES_IMAGE], env=env)
        if before and before != layer:  # the layer of other requirements: unused now, ~1 GB
            subprocess.run(["podman", "rmi", before], env=env, capture_output=True)
    return out


def wait_ready(url: str, timeout: float = 120) -> float:
    """Seconds until GET {url}/readyz answers 200."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url}/readyz did not answer 200 within {timeout} s")


def deployment_manifest() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text())


def podman_flags_like_kubernetes(deployment: dict, secrets: dict[str, dict[str, str]] | None = None) -> list[str]:
    """`podman run` flags that give the container what the Deployment gives its pod: environment (values from
    `secrets`, {secret name: {key: value}}, where the manifest reads a Secret), user, read-only root with emptyDir
    mounts, no capabilities, no privilege escalation."""
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    sc = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    flags = [f"--env={name}={value}" for name, value in _env(container, secrets or {})]
    if "runAsUser" in sc:
        flags.append(f"--user={sc['runAsUser']}:{sc.get('runAsGroup', sc['runAsUser'])}")
    if sc.get("readOnlyRootFilesystem"):
        flags.append("--read-only")
    empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    flags += [f"--tmpfs={m['mountPath']}" for m in container.get("volumeMounts", []) if m["name"] in empty_dirs]
    if "ALL" in sc.get("capabilities", {}).get("drop", []):
        flags.append("--cap-drop=ALL")
    if sc.get("allowPrivilegeEscalation") is False:
        flags.append("--security-opt=no-new-privileges")
    return flags


def _env(container: dict, secrets: dict[str, dict[str, str]]) -> list[tuple[str, str]]:
    """The container's environment as Kubernetes resolves it: a missing optional Secret key leaves the variable
    unset; a missing required one stops the pod (here: an error naming it)."""
    env = []
    for e in container.get("env", []):
        if "value" in e:
            env.append((e["name"], str(e["value"])))
            continue
        ref = e["valueFrom"]["secretKeyRef"]
        value = secrets.get(ref["name"], {}).get(ref["key"])
        if value is None and not ref.get("optional", False):
            raise KeyError(f"{e['name']} needs key {ref['key']!r} of Secret {ref['name']!r}, which was not given")
        if value is not None:
            env.append((e["name"], value))
    return env
