"""Real photos that ship inside installed packages: the demo's inputs and the built-in model's parity images.

Found by file path (importlib.util.find_spec), so neither scikit-image nor matplotlib is imported.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

# (package, path inside it, what an ImageNet classifier should see)
SAMPLE_PHOTOS = [
    ("skimage", "data/coffee.png", "espresso"),
    ("skimage", "data/chelsea.png", "a cat (tabby / tiger cat / Egyptian cat)"),
    ("skimage", "data/rocket.jpg", "missile / projectile"),
    ("skimage", "data/astronaut.png", "a person in a space suit"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "military uniform"),
]


def sample_photos() -> list[Path]:
    """Paths of the sample photos that are installed (scikit-image and matplotlib are dependencies)."""
    found = []
    for package, rel, _ in SAMPLE_PHOTOS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(list(spec.submodule_search_locations)[0]) / rel
        if path.is_file():
            found.append(path)
    return found
