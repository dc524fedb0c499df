"""tuneserve: fine-tune pretrained CNNs, export to ONNX, serve GPU-batched over HTTP.

The code lives in three packages, `tuneserve.models` (what a model is), `tuneserve.training` and
`tuneserve.service`, kept in the repository's root folders models/, training/ and service/.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path

__version__ = "0.1.0"

SUBPACKAGES = ("models", "training", "service")

# BentoML reports usage (commands, model saves, served requests) to BentoML's servers unless this is set.
# tuneserve turns it off unless the user has chosen: BENTOML_DO_NOT_TRACK=False lets BentoML track again.
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")


# Why the Bento carries source and this finder rather than the wheel (BentoML's `python.wheels`): BentoML 1.4
# installs a packed wheel with its dependencies (its install.sh has no --no-deps), and tuneserve's include
# torch, torchvision, timm and matplotlib for training: ~5 GB more in the serving image (torch 1.2 GB, its
# nvidia-* CUDA libraries 3.2 GB, triton 0.9 GB), none of it in the offline build's wheelhouse (made from the
# Bento's requirements.txt); and a wheel, named in bentofile.yaml with its version, would have to be built
# before every `bentoml build`. It can go once the serving dependencies are the package's and training's an extra.
class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Finds `tuneserve.<name>` for the three subpackages in `root/<name>/`, and nothing else.

    An installed wheel holds them inside this package (pyproject's package-dir). A source tree (a checkout, or
    a Bento, which copies the repository's folders as they are: bentofile.yaml) has them beside tuneserve/,
    where this finder points the names at them."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname: str, path=None, target=None) -> ModuleSpec | None:
        parent, _, name = fullname.rpartition(".")
        if parent != __name__ or name not in SUBPACKAGES:
            return None
        init = self.root / name / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(init.parent)])


def _map_source_tree() -> None:
    here = Path(__file__).resolve().parent
    if (here / "models").is_dir():
        return  # installed: the subpackages are inside this one
    if not any(isinstance(f, _SourceTreeFinder) for f in sys.meta_path):
        # First: the subpackages come from beside the tuneserve/ that was imported, whatever else is installed.
        sys.meta_path.insert(0, _SourceTreeFinder(here.parent))


_map_source_tree()
