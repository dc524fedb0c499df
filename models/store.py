"""Artifacts in the BentoML model store: save under `name:version` atomically, list, load, verify, prune.

The store is BentoML's folder layout, `$BENTOML_HOME/models/<name>/<version>/` (BentoML's model.yaml beside
our files) and `<name>/latest`, so `bentoml models list`, `bentoml build` and BentoCloud see our models.

A save builds the whole version in a staging folder inside BENTOML_HOME (the same filesystem as the store),
with BentoML's own model writer, and moves it into the store with one `os.rename`: a save killed at any
instant leaves either the complete version or nothing in the store; what it leaves in staging, the next
save or `tuneserve models prune` removes. The card lists every file with its size and sha256, so a file
cut short or changed after registration is found (`verify`) before it is served. Versions that are not
complete (left by an interrupted save of an older tuneserve, or damaged since) are skipped with a warning
when listing, and `prune` removes them. BentoML is imported lazily: it is slow to import.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tuneserve.models.artifact import CARD_FILE, EXPLAIN_ONNX_FILE, ONNX_FILE, ModelCard

log = logging.getLogger(__name__)

FRAMEWORK_LABEL = "tuneserve-onnx"  # marks our entries among whatever else lives in the store
BENTOML_MODEL_FILE = "model.yaml"  # BentoML's description of a store entry
STAGING_DIR = "tuneserve-staging"  # inside BENTOML_HOME; never inside models/, which BentoML lists
_OWNER_FILE = "owner.pid"
NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"  # also the OpenAPI pattern of a model name
_NAME_RE = re.compile(NAME_PATTERN)


class ModelNotFoundError(LookupError):
    pass


class ModelIntegrityError(RuntimeError):
    """A registered version's files are missing, cut short or changed since registration."""


@dataclass(frozen=True)
class StoredModel:
    tag: str  # "name:version"
    path: Path  # directory in the store
    card: ModelCard
    creation_time: str = ""

    @property
    def name(self) -> str:
        return self.tag.split(":", 1)[0]

    @property
    def version(self) -> str:
        return self.tag.split(":", 1)[1]

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def explain_path(self) -> Path | None:
        """The graph that also answers class activation maps (card.explain_output), or None: the model cannot
        explain (exported before maps). Exports of one development version kept them in model.onnx itself."""
        if self.card.explain_output is None:
            return None
        separate = self.path / EXPLAIN_ONNX_FILE
        return separate if separate.is_file() else self.onnx_path

    def __repr__(self) -> str:  # the card's 1,000 labels are not worth printing
        return f"StoredModel({self.tag!r}, {str(self.path)!r})"


def validate_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(
            f"model name {name!r} is not valid: use 1-63 lowercase letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit"
        )
    return name


# -- where things are -------------------------------------------------------------------------------------------

def bentoml_home() -> Path:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.bentoml_home.get())


def models_root() -> Path:
    """The folder of the model store BentoML uses now: $BENTOML_HOME/models, or, while it serves a Bento,
    the Bento's own models/ (BentoML swaps the store in)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.model_store.get()._path)


@contextlib.contextmanager
def staging_dir(purpose: str) -> Iterator[Path]:
    """A scratch folder in BENTOML_HOME's staging area, removed afterwards. It records its owner's pid, so that
    one left by a killed process is recognised as stale (`prune_staging`)."""
    root = bentoml_home() / STAGING_DIR
    root.mkdir(parents=True, exist_ok=True)
    prune_staging()
    folder = root / f"{purpose}-{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    (folder / _OWNER_FILE).write_text(str(os.getpid()))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def prune_staging() -> list[Path]:
    """Remove staging folders whose owner process is gone; returns them."""
    root = bentoml_home() / STAGING_DIR
    removed = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            pid = int((folder / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            pid = 0  # no owner recorded: killed before it wrote one
        if pid and _alive(pid):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _temporary_files_in(folder: Path) -> Iterator[None]:
    """Python's tempfile (BentoML's model writer makes its working folder with it) writes into `folder` here,
    so that a killed save leaves its bytes in staging, not in /tmp."""
    saved = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = saved


# -- saving ------------------------------------------------------------------------------------------------------

def file_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """{file name: {"bytes", "sha256"}} for every file in `folder` but the card and BentoML's model.yaml."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(folder.iterdir())
            if p.is_file() and p.name not in (CARD_FILE, BENTOML_MODEL_FILE)}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_model(name: str, card: ModelCard, onnx_path: Path, extra_files: dict[str, Path] | None = None) -> StoredModel:
    """Register `onnx_path` + card (+ extra files, stored under their given names) as a new `name:version`,
    all at once or not at all."""
    import bentoml
    from bentoml._internal.models.model import ModelStore

    validate_name(name)
    metadata: dict[str, Any] = {
        "arch": card.arch,
        "num_classes": card.num_classes,
        **{k: v for k, v in card.metrics.items() if isinstance(v, (int, float, str, bool))},
    }
    with staging_dir(f"save-{name}") as staging, _temporary_files_in(staging):
        staged_store = staging / "store"
        with bentoml.models.create(name, labels={"framework": FRAMEWORK_LABEL, "arch": card.arch},
                                   metadata=metadata, _model_store=ModelStore(staged_store)) as bento_model:
            tag = bento_model.tag
            target = Path(bento_model.path)
            shutil.copyfile(onnx_path, target / ONNX_FILE)
            for dest_name, src in (extra_files or {}).items():
                shutil.copyfile(src, target / dest_name)
            dataclasses.replace(card, files=file_manifest(target)).write(target)
        final = models_root() / tag.name / tag.version
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staged_store / tag.name / tag.version, final)  # the one step that makes it visible
        _write_latest(tag.name, tag.version)
    log.info("registered %s in the BentoML model store", tag)
    return load_model(str(tag))


def _write_latest(name: str, version: str) -> None:
    """BentoML's `<name>/latest` pointer, replaced atomically. tuneserve finds the latest version by creation
    time and does not depend on it; `bentoml` commands do."""
    latest = models_root() / name / "latest"
    tmp = latest.with_name(f".latest-{uuid.uuid4().hex[:8]}")
    tmp.write_text(version)
    os.replace(tmp, latest)


# -- reading -----------------------------------------------------------------------------------------------------

def _read_version(folder: Path) -> StoredModel:
    """A tuneserve version folder -> StoredModel; ValueError (with the reason) when it is not a complete one,
    LookupError when it is a complete store entry that is not a tuneserve model."""
    import bentoml
    from bentoml.exceptions import BentoMLException

    if not (folder / BENTOML_MODEL_FILE).is_file():
        raise ValueError(f"no {BENTOML_MODEL_FILE} (an interrupted save)")
    try:
        info = bentoml.models.get(f"{folder.parent.name}:{folder.name}").info
    except BentoMLException as e:
        raise ValueError(f"BentoML cannot read it: {e}") from None
    if info.labels.get("framework") != FRAMEWORK_LABEL:
        raise LookupError(f"{folder.parent.name}:{folder.name} is not a tuneserve model")
    if not (folder / CARD_FILE).is_file():
        raise ValueError(f"no {CARD_FILE} (an interrupted save)")
    card = ModelCard.read(folder)
    problem = _missing_files(folder, card)
    if problem:
        raise ValueError(problem)
    return StoredModel(f"{folder.parent.name}:{folder.name}", folder, card, str(info.creation_time))


def _missing_files(folder: Path, card: ModelCard) -> str | None:
    """Why the files do not match the card's manifest by name and size (cheap: no hashing), or None."""
    expected = card.files or {ONNX_FILE: None}  # cards written before manifests: the graph must exist
    for name, entry in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if entry is not None and path.stat().st_size != entry["bytes"]:
            return f"{name} is {path.stat().st_size} bytes, registered as {entry['bytes']}"
    return None


def _version_folders() -> Iterator[Path]:
    root = models_root()
    for name_dir in sorted(root.iterdir()) if root.is_dir() else []:
        if name_dir.is_dir():
            yield from sorted(p for p in name_dir.iterdir() if p.is_dir())


def scan_store() -> tuple[list[StoredModel], list[tuple[Path, str]]]:
    """(complete tuneserve models, newest first; incomplete version folders with the reason). Folders of other
    frameworks' complete models are in neither."""
    found, broken = [], []
    for folder in _version_folders():
        try:
            found.append(_read_version(folder))
        except LookupError:
            continue
        except (OSError, ValueError, KeyError) as e:
            broken.append((folder, str(e)))
    return sorted(found, key=lambda s: s.creation_time, reverse=True), broken


def list_models() -> list[StoredModel]:
    """Complete tuneserve models in the store, newest first; incomplete ones are skipped with a warning."""
    found, broken = scan_store()
    for folder, why in broken:
        log.warning("skipping %s:%s: %s; `tuneserve models prune` removes it", folder.parent.name, folder.name, why)
    return found


def load_model(tag: str) -> StoredModel:
    """`name` (its newest complete version) or `name:version` from the store."""
    name, _, version = tag.partition(":")
    if not _NAME_RE.match(name) or (version and not re.fullmatch(r"[A-Za-z0-9._-]+", version)):
        raise ModelNotFoundError(f"{tag!r} is not a valid model tag: use name or name:version")
    if version and version != "latest":
        folder = models_root() / name / version
        if not folder.is_dir():
            raise _not_found(tag)
        try:
            return _read_version(folder)
        except LookupError:
            raise ModelNotFoundError(f"{tag} is in the BentoML model store but is not a tuneserve model") from None
        except (OSError, ValueError, KeyError) as e:
            raise ModelNotFoundError(f"{tag} is incomplete ({e}); `tuneserve models prune` removes it") from None
    versions = [m for m in list_models() if m.name == name]
    if not versions:
        raise _not_found(tag)
    return versions[0]


def _not_found(tag: str) -> ModelNotFoundError:
    known = ", ".join(s.tag for s in list_models()) or "none"
    return ModelNotFoundError(f"model {tag!r} is not in the BentoML model store (tuneserve models: {known})")


def verify(model: StoredModel, files: tuple[str, ...] | None = None) -> None:
    """Check `files` (default: every file in the card's manifest) against their registered sha256; raises
    ModelIntegrityError naming the file. Cards written before manifests have nothing to check against."""
    for name, entry in model.card.files.items():
        if files is not None and name not in files:
            continue
        path = model.path / name
        if not path.is_file():
            raise ModelIntegrityError(f"{model.tag}: {name} is missing from {model.path}")
        if path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
            raise ModelIntegrityError(
                f"{model.tag}: {name} has changed since it was registered ({path.stat().st_size} bytes, registered "
                f"{entry['bytes']}; sha256 differs): the file is damaged. Register the model again, or serve "
                "another version")


# -- removing ----------------------------------------------------------------------------------------------------

def prune(dry_run: bool = False) -> list[tuple[str, str]]:
    """Remove incomplete version folders and stale staging folders; returns (what, why) for each."""
    _, broken = scan_store()
    removed = [(f"{folder.parent.name}:{folder.name}", why) for folder, why in broken]
    if dry_run:
        root = bentoml_home() / STAGING_DIR
        stale = [p for p in (root.iterdir() if root.is_dir() else []) if not _owner_alive(p)]
        return removed + [(str(p), "staging folder of a save that did not finish") for p in stale]
    for folder, _ in broken:
        shutil.rmtree(folder, ignore_errors=True)
        _repair_latest(folder.parent)
    removed += [(str(p), "staging folder of a save that did not finish") for p in prune_staging()]
    return removed


def _owner_alive(folder: Path) -> bool:
    try:
        return _alive(int((folder / _OWNER_FILE).read_text()))
    except (OSError, ValueError):
        return False


def _repair_latest(name_dir: Path) -> None:
    """After removing a version: point `latest` at the newest remaining one, or drop an emptied name."""
    remaining = [m for m in list_models() if m.name == name_dir.name]
    if remaining:
        _write_latest(name_dir.name, remaining[0].version)
    elif not any(p.is_dir() for p in name_dir.iterdir()):
        shutil.rmtree(name_dir, ignore_errors=True)
