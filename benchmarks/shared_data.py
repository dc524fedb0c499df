"""Where the real photo sets are, for the benchmarks and the tests alike: `../shared/datasets` beside the
checkout, or the folder named by $TUNESERVE_DATASETS."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository
DATASETS = Path(os.environ.get("TUNESERVE_DATASETS") or ROOT.parent / "shared" / "datasets")
HYMENOPTERA = DATASETS / "hymenoptera"  # {train,val}/{ants,bees}/*.jpg: 398 photos, one GIF placeholder
