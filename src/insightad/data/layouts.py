"""Dataset layouts (MVTec AD, normal/abnormal folders, crack sets, a flat folder) and their splits."""

from __future__ import annotations

import functools
import os
import random
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from insightad.data.images import not_scored_note, other_image_formats
from insightad.errors import InsightADError
from insightad.io import file_sha256, has_image_name, is_image_file, is_regular_file, list_images

NORMAL, ANOMALOUS = 0, 1
MASK_DIRS = ("ground_truth", "masks", "mask")


@dataclass(frozen=True)
class Sample:
    """One image of a dataset: where it is, what it is, where its mask is (if any)."""

    path: Path
    label: int  # 0 normal, 1 anomalous
    defect: str  # "good" for normal images, else the defect type
    split: str  # "train" or "test"
    mask: Path | None = None


@dataclass
class Dataset:
    """The images under ``root`` in a known layout. ``has_test_split``: the layout names its test images."""

    root: Path
    layout: str
    samples: list[Sample] = field(default_factory=list)
    has_test_split: bool = False

    def rel(self, path: Path) -> str:
        """Path relative to the root, with forward slashes (what model files record). A symbolic link (an image
        or a folder) to somewhere outside the root: the link's own path under the root (resolving it was a
        traceback at the split)."""
        try:
            return path.resolve().relative_to(self.root).as_posix()
        except ValueError:
            return Path(os.path.abspath(path)).relative_to(self.root).as_posix()

    @property
    def train(self) -> list[Sample]:
        return [s for s in self.samples if s.split == "train"]

    @property
    def test(self) -> list[Sample]:
        return [s for s in self.samples if s.split == "test"]

    def counts(self) -> dict[str, int]:
        return {"normal": sum(s.label == NORMAL for s in self.samples),
                "anomalous": sum(s.label == ANOMALOUS for s in self.samples)}


def _is_mask_name(path: Path) -> bool:
    """``<stem>_mask.<ext>`` in any case (``003_MASK.PNG`` too, as uppercase extensions are images)."""
    return path.stem.lower().endswith("_mask")


def _images_in(folder: Path) -> list[Path]:
    """The images of a dataset folder; images of a format not accepted (WebP, GIF, ...) and names that are no
    readable file (a broken link, a pipe) are said in one warning line each, never passed over in silence."""
    skipped: list[Path] = []
    not_files: list[Path] = []
    images = [p for p in list_images(folder, skip_dirs=MASK_DIRS, skipped=skipped, not_files=not_files)
              if not _is_mask_name(p)]
    note = not_scored_note(folder, other_image_formats(skipped), "convert them to PNG to use them", verb="used")
    if note:
        warnings.warn(note, stacklevel=2)
    if not_files:  # a dataset copied with its links broken: said, not left out unseen
        warnings.warn(f"{len(not_files)} image names under {folder} are not readable files (a broken link, a pipe) "
                      f"and are left out, e.g. {not_files[0].name}", stacklevel=3)
    return images


def _require_images(folder: Path, what: str) -> list[Path]:
    images = _images_in(folder)
    if not images:
        raise InsightADError(f"{folder}: no images found (expected {what}: .png, .jpg, .jpeg, .bmp, .tif or .tiff files)")
    return images


def _find_dir(root: Path, name: str) -> Path | None:
    """``root/name``, matched case-insensitively."""
    exact = root / name
    if exact.is_dir():
        return exact
    for p in root.iterdir():
        if p.is_dir() and p.name.lower() == name.lower():
            return p
    return None


def _mask_index(*folders: Path) -> dict[str, list[Path]]:
    """``<defect>/<stem>`` and ``<stem>`` of the image -> its mask files, from ``<stem>_mask.<ext>`` files under the
    given folders (several where a name is not unique: :func:`_match_masks` gives those to no image)."""
    index: dict[str, list[Path]] = {}
    for folder in folders:
        if folder is None or not folder.is_dir():
            continue
        for p in sorted(folder.rglob("*.*")):
            if _is_mask_name(p) and p.is_file():
                for key in (_defect_key(p.parent.name, p.stem[: -len("_mask")]), p.stem[: -len("_mask")]):
                    if p not in index.setdefault(key, []):
                        index[key].append(p)
    return index


def _match_masks(root: Path, images: list[tuple[Path, str]], masks: dict[str, list[Path]]) -> list[Path | None]:
    """The mask of each anomalous (image, defect): by ``<defect>/<stem>``, else by ``<stem>``. A name that several
    mask files hold, or that several images would take, gives none of them a mask (one warning line): two images
    of one name in two defect folders took one flat ``masks/000_mask.png`` between them, unsaid."""
    keys = [_defect_key(d, p.stem) if _defect_key(d, p.stem) in masks else p.stem for p, d in images]
    takers = Counter(keys)
    out: list[Path | None] = []
    unclear: list[tuple[Path, str]] = []
    for (p, _), key in zip(images, keys):
        files = masks.get(key, [])
        out.append(files[0] if len(files) == 1 and takers[key] == 1 else None)
        if files and out[-1] is None:
            unclear.append((p, key))
    if unclear:
        p, key = unclear[0]
        warnings.warn(f"{len(unclear)} anomalous images of {root} cannot be matched to one mask (e.g. "
                      f"{_under(root, p)}: '{key}' names {len(masks[key])} mask files and {takers[key]} images); "
                      "they get none, so the pixel metrics leave them out: give each defect its own mask folder "
                      "with one <stem>_mask.<ext> per image (<masks>/<defect>/<stem>_mask.<ext>)", stacklevel=4)
    return out


def _under(root: Path, path: Path) -> str:
    """``path`` relative to ``root`` with forward slashes where it lies under it, else as given."""
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def _defect_key(defect: str, stem: str) -> str:
    return f"{defect}/{stem}"


def _warn_unused_mask_files(root: Path, folders: list[Path], samples: list[Sample],
                            normal_stems: frozenset[str] = frozenset(),
                            unclear: frozenset[Path] = frozenset()) -> None:
    """Say which image files of the mask folders no image uses: a mask whose ``<stem>`` names no anomalous image
    (nor one of ``normal_stems``, whose masks mark nothing), or a file not named ``<stem>_mask.<ext>`` at all.
    A naming slip left the pixel metrics out, or scored the image it meant without its mask, without a word."""
    used = {s.mask for s in samples if s.mask is not None}
    files = [p for folder in folders if folder.is_dir() for p in sorted(folder.rglob("*.*"))
             if has_image_name(p) and p.is_file() and p not in used and p not in unclear]  # (said already)
    orphans = [p for p in files if _is_mask_name(p) and p.stem[: -len("_mask")] not in normal_stems]
    misnamed = [p for p in files if not _is_mask_name(p)]
    for group, what in ((orphans, "belong to no anomalous image"), (misnamed, "are not named <stem>_mask.<ext>")):
        if group:
            warnings.warn(f"{len(group)} files in the mask folders of {root} {what} (e.g. {_under(root, group[0])}); "
                          "not used: the mask of an anomalous image <stem>.<ext> is <stem>_mask.<ext> (MVTec AD: "
                          "ground_truth/<defect>/)", stacklevel=4)


def _mvtec(root: Path) -> Dataset:
    train_good = root / "train" / "good"
    if not train_good.is_dir():
        raise InsightADError(f"{root}: MVTec AD layout needs {train_good}")
    samples = [Sample(p, NORMAL, "good", "train") for p in _require_images(train_good, "normal training images")]
    test = root / "test"
    if not test.is_dir():
        raise InsightADError(f"{root}: MVTec AD layout needs a test/ folder")
    gt = root / "ground_truth"
    unclear: set[Path] = set()
    for sub in sorted(p for p in test.iterdir() if p.is_dir()):
        if sub.name == "good":
            samples += [Sample(p, NORMAL, "good", "test") for p in _images_in(sub)]
            continue
        masks = {k: v for k, v in _mask_index(gt / sub.name).items() if "/" not in k}
        images = _images_in(sub)
        found = _match_masks(root, [(p, sub.name) for p in images], masks)
        samples += [Sample(p, ANOMALOUS, sub.name, "test", m) for p, m in zip(images, found)]
        unclear.update(f for (p, m) in zip(images, found) if m is None for f in masks.get(p.stem, []))
    if not any(s.split == "test" for s in samples):
        raise InsightADError(f"{test}: no test images found")
    _warn_unused_mask_files(root, [gt], samples, unclear=frozenset(unclear))
    loose = [p for folder in (root / "train", test) for p in sorted(folder.iterdir())
             if is_image_file(p) and is_regular_file(p)]
    if loose:  # said, not skipped unseen: MVTec AD's labels are its folders
        warnings.warn(f"{len(loose)} images directly in train/ or test/ of {root} are not used (e.g. "
                      f"{loose[0].relative_to(root).as_posix()}): MVTec AD keeps them in one folder per kind, "
                      "train/good/, test/good/, test/<defect>/", stacklevel=3)
    return Dataset(root, "mvtec", samples, has_test_split=True)


def _labelled(root: Path, normal: Path, abnormal: Path | None, layout: str) -> Dataset:
    masks = _mask_index(*[root / d for d in MASK_DIRS], normal, *(x for x in [abnormal] if x))
    samples = [Sample(p, NORMAL, "good", "train") for p in _require_images(normal, "normal images")]
    if abnormal is not None:
        images = [(p, _defect_of(p, abnormal)) for p in _images_in(abnormal)]
        found = _match_masks(root, images, masks)
        samples += [Sample(p, ANOMALOUS, defect, "test", m) for (p, defect), m in zip(images, found)]
        unclear = {f for (p, d), m in zip(images, found) if m is None
                   for f in masks.get(_defect_key(d, p.stem), masks.get(p.stem, []))}
        # (masks of normal images mark nothing: normal images count as defect-free with or without one)
        _warn_unused_mask_files(root, [root / d for d in MASK_DIRS], samples,
                                frozenset(s.path.stem for s in samples if s.label == NORMAL), frozenset(unclear))
    return Dataset(root, layout, samples, has_test_split=False)


def _defect_of(image: Path, abnormal: Path) -> str:
    """An anomalous image's defect type: its folder under ``abnormal``, or the folder's own name for one directly in it."""
    parts = image.relative_to(abnormal).parts
    return parts[0] if len(parts) > 1 else abnormal.name.lower()


def _images_only(root: Path) -> Dataset:
    samples = [Sample(p, NORMAL, "good", "train") for p in _require_images(root, "normal images")]
    nested = sorted({s.path.relative_to(root).parts[0] for s in samples if s.path.parent != root})
    if nested:  # every image here is taken as normal: a defect folder beside them would be trained on, unsaid
        n = sum(s.path.parent != root for s in samples)
        warnings.warn(f"{n} images in sub-folders of {root} ({', '.join(nested[:3])}{', ...' if len(nested) > 3 else ''}"
                      ") are used as normal images (a flat folder of normal images); for anomalous images use the "
                      "folder layout: normal/ and abnormal/", stacklevel=3)
    return Dataset(root, "images", samples, has_test_split=False)


def detect_layout(root: Path, normal_dir: str = "normal") -> str:
    """Which layout a folder holds, or a clear error listing what was looked for."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "mvtec"
    if _find_dir(root, "Negative"):  # Positive/ is optional: a crack-style set with no defects yet
        return "crack"
    if _find_dir(root, normal_dir):  # abnormal/ is optional: training needs good images only
        return "folder"
    cats = [p.name for p in sorted(root.iterdir()) if (p / "train" / "good").is_dir()]
    if cats:
        raise InsightADError(f"{root}: holds several MVTec AD categories; point at one of them, e.g. {root / cats[0]} "
                             f"(found: {', '.join(cats)})")
    if any(is_image_file(p) and is_regular_file(p) for p in root.iterdir()):
        return "images"
    _require_images(root, "images in it or its sub-folders")  # none at all: --layout would not help
    raise InsightADError(f"{root}: cannot tell the dataset layout: expected train/ and test/ (MVTec AD), "
                         f"{normal_dir}/ [+ abnormal/] (folder), Negative/ [+ Positive/] (crack) or image files; "
                         "set --layout")


def _check_folder_name(root: Path, flag: str, name: str) -> None:
    """A folder inside the dataset (a name, or a relative path below the root): '' or '.' made the whole dataset
    (anomalous images included) the normal images; '../x' or an absolute path read images outside it."""
    if not name.strip() or Path(name).is_absolute() or ".." in Path(name).parts or Path(name) == Path("."):
        raise InsightADError(f"{flag}: expected the name of a folder inside {root}, got {name!r}")


def discover(path: str | Path, layout: str = "auto", normal_dir: str = "normal",
             abnormal_dir: str = "abnormal") -> Dataset:
    """Read a dataset folder into samples; the layout is detected unless given."""
    root = Path(path).expanduser()
    if not root.exists():
        raise InsightADError(f"{root}: no such file or folder")
    if not root.is_dir():
        raise InsightADError(f"{root}: expected a dataset folder, got a file")
    root = root.resolve()
    for flag, name in (("--normal-dir", normal_dir), ("--abnormal-dir", abnormal_dir)):
        _check_folder_name(root, flag, name)
    if normal_dir.lower() == abnormal_dir.lower():  # matched case-insensitively: one folder would be both
        raise InsightADError(f"--abnormal-dir: names the same folder as --normal-dir ({normal_dir!r}); the normal "
                             "and anomalous images must be in different folders")
    if layout == "auto":
        layout = detect_layout(root, normal_dir)
    if layout == "mvtec":
        return _mvtec(root)
    if layout == "crack":
        neg, pos = _find_dir(root, "Negative"), _find_dir(root, "Positive")
        if neg is None:
            raise InsightADError(f"{root}: crack layout needs a Negative/ folder of normal images")
        return _labelled(root, neg, pos, "crack")
    if layout == "folder":
        normal = _find_dir(root, normal_dir)
        if normal is None:
            raise InsightADError(f"{root}: folder layout needs {root / normal_dir} (set --normal-dir)")
        return _labelled(root, normal, _find_dir(root, abnormal_dir), "folder")
    if layout == "images":
        return _images_only(root)
    raise InsightADError(f"layout: expected auto, mvtec, folder, crack or images, got {layout!r}")


# ------------------------------------------------------------------------------------- splits
def holdout_split(ds: Dataset, fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, held-out) normal samples. Layouts with a test split train on all of train/."""
    normals = [s for s in ds.samples if s.split == "train"]
    if ds.has_test_split or fraction <= 0:
        return normals, []
    order = sorted(normals, key=lambda s: ds.rel(s.path))
    random.Random(seed).shuffle(order)
    n_hold = int(round(len(order) * fraction))
    if len(order) - n_hold < 1:
        raise InsightADError(f"{ds.root}: {len(order)} normal images are too few to hold out {fraction:.0%}")
    held = sorted(order[:n_hold], key=lambda s: s.path)
    train = sorted(order[n_hold:], key=lambda s: s.path)
    return train, [replace(s, split="test") for s in held]


def training_overlap(paths: list[Path], split: dict | None, root: Path | None = None,
                     digest: Callable[[Path], str] | None = None) -> list[tuple[list[Path], str, str]]:
    """The ``paths`` a model was trained on (or its ``ssl:`` backbone was fine-tuned on), given the training split
    it recorded, by path (under its root, or ``root`` for a dataset that moved) and by content where the record
    keeps hashes (a copied or renamed training image): (images, what they were used for, what to do instead) per
    record that has any. ``digest``: the sha256 of a file, memoised by a caller that hashes the same images."""
    if not split:
        return []
    digest = digest or functools.cache(file_sha256)  # the model's and the backbone's records: each file once
    backbone = split.get("backbone") or {}
    out = []
    for record, base, used, instead in (
            (split, root, "was used to train the model{copy}",
             "give images the model was not trained on: its held-out or new ones"),
            (backbone, None, f"was used to fine-tune the model's backbone ({backbone.get('file')}){{copy}}",
             "fine-tune the backbone with the model's --holdout and --seed, or evaluate on new images")):
        overlap = _seen(paths, record, base, digest)
        if overlap:
            first, twin = overlap[0]
            used = used.replace("{copy}", f" (its content, as {twin})" if twin else "")  # a copy: of which file
            more = f" (and {len(overlap) - 1} more)" if len(overlap) > 1 else ""
            out.append(([p for p, _ in overlap], f"{first}: this image{more} {used}", instead))
    return out


def refuse_training_images(paths: list[Path], split: dict | None, root: Path | None = None,
                           digest: Callable[[Path], str] | None = None) -> None:
    """Refuse, in one line naming the first, images a model was trained on (``training_overlap``): its scores on
    them say nothing (``calibrate --labels``: a threshold chosen on a labelled list the user gave)."""
    for _, said, instead in training_overlap(paths, split, root, digest)[:1]:
        raise InsightADError(f"{said}; refusing to score training images ({instead})")


def without_training_images(samples: list[Sample], split: dict | None, root: Path | None = None,
                            digest: Callable[[Path], str] | None = None) -> list[Sample]:
    """``samples`` less the images a model was trained on (``training_overlap``), with one warning line per record
    naming the first and how many: its scores on them say nothing, and one duplicate in a dataset (concrete_crack
    has byte-identical negatives) must not refuse the whole evaluation of the images the model never saw."""
    left_out: set[Path] = set()
    for images, said, instead in training_overlap([s.path for s in samples], split, root, digest):
        left_out.update(images)
        warnings.warn(f"{said}; left out of the evaluation, which scores the rest ({instead})", stacklevel=3)
    return [s for s in samples if s.path not in left_out]


def evaluation_samples(ds: Dataset, split: dict | None) -> list[Sample]:
    """The images to score on ``ds``, given the training split a model recorded.

    Same dataset as training (the recorded root, or a copy of it elsewhere: every training file found at its
    relative path with the recorded content): the test split, or the held-out normals plus the anomalous
    images. Another path: every image. Either way an image the model was trained on is left out, with a warning,
    by path or by content (a renamed or copied training image), and so is an image its ``ssl:`` backbone was
    fine-tuned on (``split["backbone"]``) (``without_training_images``); none left is an error.
    """
    split = split or {}
    digest = functools.cache(file_sha256)  # new normals are hashed, then checked against training content
    same_root = bool(split) and (Path(split.get("root", "")) == ds.root or _moved_here(ds, split))
    if same_root:
        if ds.has_test_split:
            chosen = ds.test
        else:
            held = {(ds.root / r).resolve() for r in split.get("holdout", [])}
            chosen = [replace(s, split="test") for s in ds.samples
                      if s.label == ANOMALOUS or s.path.resolve() in held]
            chosen += _new_normals(ds, split, held, digest)
    else:
        chosen = [replace(s, split="test") for s in (ds.test if ds.has_test_split else ds.samples)]
    if not chosen:
        raise InsightADError(f"{ds.root}: no images left to evaluate (all normal images were used for training)")
    kept = without_training_images(chosen, split, ds.root if same_root else None, digest)
    if not kept:
        raise InsightADError(f"{ds.root}: no images left to evaluate: all {len(chosen)} were used to train the model "
                             "(give images the model was not trained on: its held-out or new ones)")
    return kept


def _new_normals(ds: Dataset, split: dict, held: set[Path], digest: Callable[[Path], str]) -> list[Sample]:
    """Normal images of the training dataset that are in neither recorded list (added after training) and
    whose content is no training image's: unseen normals, so evaluated (one warning line says how many).
    Needs a record with content hashes: without them a renamed training image could not be told apart."""
    hashes = set(split.get("train_sha256") or [])
    if not hashes:
        return []
    known = {(ds.root / r).resolve() for r in split.get("train", [])} | held
    new = [replace(s, split="test") for s in ds.samples if s.label == NORMAL
           and s.path.resolve() not in known and digest(s.path) not in hashes]
    if new:
        warnings.warn(f"{ds.root}: {len(new)} normal images not in the model's split (added after training) "
                      "were included in the evaluation", stacklevel=3)
    return new


def content_record(paths: list[Path]) -> list[str]:
    """The sha256 of each training file, kept beside their names in a split record: evaluation recognises a
    training image copied, moved or renamed, not only one at its recorded path."""
    return [file_sha256(p) for p in paths]


def check_training_content(ds: Dataset, train: list[Sample], held: list[Sample]) -> list[str]:
    """The sha256 of each training file (``content_record``), after two checks on them: training images that
    are all one file's content are refused (no spread to learn: a threshold of ~0 called the training images
    themselves anomalous), and held-out images that are copies of training images are named in a warning
    (evaluate and calibrate refuse copies of training images, so they cannot be scored)."""
    hashes = content_record([s.path for s in train])
    if len(hashes) > 1 and len(set(hashes)) == 1:
        raise InsightADError(f"{train[0].path}: all {len(train)} training images have this file's content; a "
                             "detector needs varied normal images (remove the copies)")
    first = dict(zip(hashes, train))
    copies = [(s, first[h]) for s, h in ((s, file_sha256(s.path)) for s in held) if h in first]
    if copies:
        (s, twin), n = copies[0], len(copies)
        what = "is a copy" if n == 1 else "are copies"
        warnings.warn(f"{n} of the {len(held)} held-out images of {ds.root} {what} of training images (e.g. "
                      f"{ds.rel(s.path)} = {ds.rel(twin.path)}); evaluate and calibrate leave them out as training "
                      "images", stacklevel=2)
    return hashes


def _moved_here(ds: Dataset, split: dict) -> bool:
    """Whether ``ds`` is the training dataset at another path: every recorded training file is found at its
    relative path under ``ds.root`` with the recorded content (needs a record with content hashes)."""
    names, hashes = split.get("train", []), split.get("train_sha256") or []
    if not names or len(hashes) != len(names):
        return False
    for rel, digest in zip(names, hashes):
        path = ds.root / rel
        if not path.is_file() or file_sha256(path) != digest:
            return False
    return True


def _seen(paths: list[Path], record: dict, root: Path | None, digest: Callable[[Path], str]
          ) -> list[tuple[Path, str | None]]:
    """The ``paths`` that ``record`` (a split: {"root", "train", "train_sha256"}) trained on: by resolved path
    under its root (or ``root`` for a dataset that moved), and by content where the record has hashes. Each with
    None (the training file itself) or the recorded name of the training file it is a copy of."""
    names = record.get("train", [])
    if not names:
        return []
    base = root or Path(record.get("root", ""))
    by_path = {(base / r).resolve() for r in names}
    hashes = record.get("train_sha256") or []
    twins = dict(zip(hashes, names)) if len(hashes) == len(names) else dict.fromkeys(hashes, "a training image")
    found: list[tuple[Path, str | None]] = []
    for p in paths:
        if p.resolve() in by_path:
            found.append((p, None))
        elif twins and digest(p) in twins:
            found.append((p, twins[digest(p)]))
    return found
