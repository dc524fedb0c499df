"""The model artifact: an ONNX graph plus everything needed to use it, described by one JSON card.

An artifact directory holds `model.onnx`, `tuneserve.json` (this card) and optional extras (metrics history,
plots). The card is what makes the model self-describing: the service needs nothing else to serve it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuneserve.models.preprocessing import Preprocessing

CARD_FILE = "tuneserve.json"
ONNX_FILE = "model.onnx"
FP16_ONNX_FILE = "model.fp16.onnx"  # optional half-precision variant (same input, fp32 logits), for GPUs
INT8_ONNX_FILE = "model.int8.onnx"  # optional INT8 variant (QDQ, static quantization), for CPUs
VARIANT_FILES = {"fp16": FP16_ONNX_FILE, "int8": INT8_ONNX_FILE}  # precision -> its graph; fp32 is ONNX_FILE
# The fp32 graph with the class activation map output beside the logits (card.explain_output names it). A graph
# of its own because onnxruntime runs every node of a graph whatever outputs a call asks for: in model.onnx the
# maps would cost every classification their compute (1000-class Lite0 on CPU: 10-14% of its img/s).
EXPLAIN_ONNX_FILE = "model.explain.onnx"
# The trained PyTorch weights (safetensors: no pickle), so that training can continue from a registered model
# (`tuneserve train --init-from TAG`). Absent in models registered before it existed.
WEIGHTS_FILE = "weights.safetensors"
FORMAT_VERSION = 1


@dataclass
class ModelCard:
    arch: str
    labels: list[str]
    preprocessing: Preprocessing
    metrics: dict[str, Any] = field(default_factory=dict)  # final validation metrics of the exported weights
    train_config: dict[str, Any] = field(default_factory=dict)  # the TrainConfig that produced it
    parity: dict[str, Any] = field(default_factory=dict)  # ONNX-vs-PyTorch report from the export gate
    # Other precisions of the same graph, by name ("fp16", "int8"): {"file", "kept", "top1_agreement", ...}. A variant
    # is kept (its file stored) only when it agrees with fp32 on real images; see training/export.py.
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Every other file of the version: {name: {"bytes", "sha256"}}, written at registration (models/store.py),
    # so damage is found before serving. Empty in cards written before it existed.
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Lineage: the tag this model was fine-tuned from (`--init-from`), and a fingerprint of the data it was
    # trained and validated on (training/data.py, `fingerprint`). None in cards written before.
    parent: str | None = None
    data_fingerprint: str | None = None
    # The graph's input: "pixels", uint8 (N, input_size, input_size, 3), normalised inside the graph; or, in
    # models exported before pixel input, "input", float32 (N, 3, input_size, input_size), normalised.
    input_name: str = "input"
    output_name: str = "logits"  # float32 (N, num_classes)
    # The graph's class activation map output (models/explain.py's CAM_OUTPUT, "cams"): float32 (N, num_classes,
    # h, w), each class's logit at every location of the last feature grid (training/cam.py). None: the graph
    # has none (exported before it existed), and the model classifies but cannot explain.
    explain_output: str | None = None
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["preprocessing"] = self.preprocessing.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelCard":
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"artifact format_version {d.get('format_version')!r} is not supported (this tuneserve reads "
                f"{FORMAT_VERSION})"
            )
        d = dict(d)
        d["preprocessing"] = Preprocessing.from_dict(d["preprocessing"])
        return cls(**d)

    def write(self, directory: Path) -> Path:
        path = Path(directory) / CARD_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n")
        return path

    @classmethod
    def read(cls, directory: Path) -> "ModelCard":
        return cls.from_dict(json.loads((Path(directory) / CARD_FILE).read_text()))


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")
