"""Dataset discovery and checks: layouts, split, manifest, bad files, and every bad-data error."""
from __future__ import annotations

from pathlib import Path

import pytest

from support import write_image
from tuneserve.training.data import DataError, discover


def _discover(root, **kw):
    args = dict(manifest=None, val_fraction=0.2, seed=0, min_images_per_class=2)
    args.update(kw)
    return discover(str(root), **args)


def test_single_folder_is_split_stratified_and_reproducibly(tiny_folder):
    ds = _discover(tiny_folder, val_fraction=0.34)
    assert ds.classes == ["alpha", "beta", "gamma"]
    assert ds.counts("val") == [2, 2, 2] and ds.counts("train") == [4, 4, 4]
    assert not {s.path for s in ds.train} & {s.path for s in ds.val}
    again = _discover(tiny_folder, val_fraction=0.34)
    assert [s.path for s in again.val] == [s.path for s in ds.val]
    other = _discover(tiny_folder, val_fraction=0.34, seed=1)
    assert [s.path for s in other.val] != [s.path for s in ds.val]


def test_train_val_layout(tmp_path):
    for split, n in [("train", 3), ("val", 2)]:
        for c in ["cat", "dog"]:
            for i in range(n):
                write_image(tmp_path / split / c / f"{i}.jpg", seed=i)
    ds = _discover(tmp_path)
    assert ds.counts("train") == [3, 3] and ds.counts("val") == [2, 2]


def test_manifest(tmp_path):
    rows = ["path,label"]
    for c in ["x", "y"]:
        for i in range(5):
            write_image(tmp_path / "imgs" / f"{c}{i}.png", seed=i)
            rows.append(f"imgs/{c}{i}.png,{c}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    ds = _discover(tmp_path, manifest=str(tmp_path / "labels.csv"))
    assert ds.classes == ["x", "y"] and len(ds.train) + len(ds.val) == 10


def test_bad_files_are_listed_and_skipped(tiny_folder, caplog):
    (tiny_folder / "alpha" / "notes.txt").write_text("not an image")
    (tiny_folder / "alpha" / "empty.jpg").write_bytes(b"")
    good = (tiny_folder / "beta" / "0.png").read_bytes()
    (tiny_folder / "beta" / "cut.png").write_bytes(good[: len(good) // 2])
    (tiny_folder / "gamma" / ".DS_Store").write_bytes(b"\0\0")
    ds = _discover(tiny_folder)
    reasons = {Path(p).name: r for p, r in ds.skipped}
    assert set(reasons) == {"notes.txt", "empty.jpg", "cut.png"}
    assert "not an image" in reasons["notes.txt"] and "truncated" in reasons["cut.png"]
    assert "cut.png" in caplog.text
    assert len(ds.train) + len(ds.val) == 18


def test_hymenoptera_is_read_whole(hymenoptera):
    """Every photo of both splits (the real set: 245 + 153), the GIF among them, and nothing skipped."""
    ds = _discover(hymenoptera)
    on_disk = {split: len([p for p in (hymenoptera / split).rglob("*") if p.is_file()]) for split in ("train", "val")}
    assert ds.classes == ["ants", "bees"] and not ds.skipped
    assert (len(ds.train), len(ds.val)) == (on_disk["train"], on_disk["val"])
    assert any(Path(s.path).suffix == ".gif" for s in ds.train)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "no class subfolders"),
    ("one_class", "at least 2 classes"),
    ("too_few", "fewer than 2 usable training images"),
    ("all_bad", "no usable training images"),
    ("unseen_val", "validation classes \\['horse'\\] have no training folder"),
    ("empty_class", "class folders with no files in .*: \\['zebra'\\]"),
])
def test_unusable_datasets_stop_before_training(tmp_path, case, message):
    root = tmp_path / "d"
    if case == "empty":
        root.mkdir()
    elif case == "one_class":
        for i in range(4):
            write_image(root / "only" / f"{i}.png", seed=i)
    elif case == "too_few":
        for i in range(4):
            write_image(root / "many" / f"{i}.png", seed=i)
        write_image(root / "lonely" / "0.png", seed=9)
    elif case == "all_bad":
        for c in ["a", "b"]:
            (root / c).mkdir(parents=True)
            (root / c / "x.jpg").write_text("junk")
    elif case == "unseen_val":
        for split, classes in [("train", ["cat", "dog"]), ("val", ["cat", "horse"])]:
            for c in classes:
                write_image(root / split / c / "0.png", seed=1)
                write_image(root / split / c / "1.png", seed=2)
    elif case == "empty_class":
        for i in range(4):
            write_image(root / "cat" / f"{i}.png", seed=i)
            write_image(root / "dog" / f"{i}.png", seed=10 + i)
        (root / "zebra").mkdir()
        (root / "__MACOSX" / "cat").mkdir(parents=True)  # what a macOS zip unpacks to: not a class
        (root / "__MACOSX" / "cat" / "._0.png").write_bytes(b"\0\5\x16\7")
    with pytest.raises(DataError, match=message):
        _discover(root)
