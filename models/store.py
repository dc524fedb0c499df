"""Artifacts in the BentoML model store: save under `name:version`, list, load by tag.

Saving goes through `bentoml.models.create`, which writes into a temporary directory and copies into the
store only when the `with` block succeeds; on any failure (including Ctrl-C) we also remove a half-copied
store entry, so a failed save leaves nothing behind. BentoML is imported lazily: it is slow to import.
"""
from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneserve.models.artifact import CARD_FILE, ONNX_FILE, ModelCard

log = logging.getLogger(__name__)

FRAMEWORK_LABEL = "tuneserve-onnx"  # marks our entries among whatever else lives in the store
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")


class ModelNotFoundError(LookupError):
    pass


@dataclass(frozen=True)
class StoredModel:
    tag: str  # "name:version"
    path: Path  # directory in the store
    card: ModelCard
    creation_time: str = ""

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE


def validate_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(
            f"model name {name!r} is not valid: use 1-63 lowercase letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit"
        )
    return name


def save_model(name: str, card: ModelCard, onnx_path: Path, extra_files: dict[str, Path] | None = None) -> StoredModel:
    """Register `onnx_path` + card (+ extra files, stored under their given names) as a new `name:version`."""
    import bentoml

    validate_name(name)
    metadata: dict[str, Any] = {
        "arch": card.arch,
        "num_classes": card.num_classes,
        **{k: v for k, v in card.metrics.items() if isinstance(v, (int, float, str, bool))},
    }
    ctx = bentoml.models.create(
        name, labels={"framework": FRAMEWORK_LABEL, "arch": card.arch}, metadata=metadata
    )
    tag = None
    try:
        with ctx as bento_model:
            tag = str(bento_model.tag)
            target = Path(bento_model.path)
            shutil.copyfile(onnx_path, target / ONNX_FILE)
            for dest_name, src in (extra_files or {}).items():
                shutil.copyfile(src, target / dest_name)
            card.write(target)
    except BaseException:
        if tag is not None:
            _remove_partial(tag)
        raise
    log.info("registered %s in the BentoML model store", tag)
    return load_model(tag)


def _remove_partial(tag: str) -> None:
    import bentoml

    try:
        bentoml.models.delete(tag)
    except Exception:  # nothing was registered: the usual case
        pass


def load_model(tag: str) -> StoredModel:
    """Look up `name` (latest version) or `name:version` in the store."""
    import bentoml
    from bentoml.exceptions import BentoMLException, NotFound

    try:
        m = bentoml.models.get(tag)
    except NotFound:
        known = ", ".join(s.tag for s in list_models()) or "none"
        raise ModelNotFoundError(f"model {tag!r} is not in the BentoML model store (tuneserve models: {known})") from None
    except BentoMLException as e:  # malformed tag
        raise ModelNotFoundError(f"{tag!r} is not a valid model tag: {e}") from None
    path = Path(m.path)
    if not (path / CARD_FILE).is_file():
        raise ModelNotFoundError(f"{m.tag} is in the BentoML model store but is not a tuneserve model (no {CARD_FILE})")
    return StoredModel(str(m.tag), path, ModelCard.read(path), str(m.info.creation_time))


def list_models() -> list[StoredModel]:
    """tuneserve models in the store, newest first."""
    import bentoml

    found = []
    for m in bentoml.models.list():
        if m.info.labels.get("framework") != FRAMEWORK_LABEL:
            continue
        try:
            found.append(StoredModel(str(m.tag), Path(m.path), ModelCard.read(Path(m.path)), str(m.info.creation_time)))
        except (OSError, ValueError, KeyError) as e:
            log.warning("skipping unreadable model %s: %s", m.tag, e)
    return sorted(found, key=lambda s: s.creation_time, reverse=True)
