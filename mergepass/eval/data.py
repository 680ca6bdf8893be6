"""Image folders for calibration and evaluation (no downloads): a flat folder with ``labels.csv``
(``file,class_index,...``) or ImageNet-style class subfolders. Hidden files and folders are never read."""
from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path
from typing import Optional

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def data_config(model, img_size: int = 224, mean=None, std=None, crop_pct=None) -> dict:
    """Preprocessing for ``model``: timm's data config (mean, std, crop_pct) unless overridden."""
    cfg = {}
    try:
        import timm
        cfg = timm.data.resolve_data_config({}, model=model)
    except Exception:  # noqa: BLE001 - not a timm model: ImageNet defaults
        pass
    crop = crop_pct or cfg.get("crop_pct") or 0.875
    return dict(size=img_size, resize=int(round(img_size / crop)),
                mean=tuple(mean or cfg.get("mean") or IMAGENET_MEAN), std=tuple(std or cfg.get("std") or IMAGENET_STD))


def _hidden(p: Path) -> bool:
    """A name starting with ``.``: tool state such as ``.ipynb_checkpoints`` or ``.git``, never data."""
    return p.name.startswith(".")


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in EXTS and not _hidden(p) and p.is_file()


def _folder(folder: str | Path) -> Path:
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    return root


def no_images(folder: str | Path) -> ValueError:
    """The error for a folder holding no image: what was looked for, and where."""
    labels = Path(folder) / "labels.csv"
    if labels.exists():
        return ValueError(f"no images in {folder}: {labels} lists no files")
    return ValueError(f"no images in {folder}: looked for {', '.join(sorted(EXTS))} files in it and its "
                      "subfolders (hidden ones, such as .ipynb_checkpoints, are ignored)")


def find_images(folder: str | Path) -> list[Path]:
    """Every image in ``folder`` and its subfolders, at any depth, sorted by path; hidden files and folders
    are ignored. Missing folder: FileNotFoundError naming it."""
    found = []
    for where, dirs, files in os.walk(_folder(folder)):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [p for p in (Path(where) / f for f in files) if _is_image(p)]
    return sorted(found)


def list_images(folder: str | Path) -> list[tuple[Path, int]]:
    """(path, label) pairs; label -1 when unknown. The files ``labels.csv`` lists, else class subfolders
    (label: the subfolder's index, its images at any depth) and the images beside them (label -1); hidden
    files and folders are ignored. Missing folder: FileNotFoundError naming it."""
    root = _folder(folder)
    labels = root / "labels.csv"
    if labels.exists():
        return _read_labels(labels)
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not _hidden(d))
    loose = [(p, -1) for p in root.iterdir() if _is_image(p)]
    return sorted(loose + [(p, i) for i, d in enumerate(classes) for p in find_images(d)])


def _read_labels(labels: Path) -> list[tuple[Path, int]]:
    """``labels.csv``'s (path, class index) rows; ValueError naming the file, and the line of a bad row."""
    with open(labels, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "file" not in (reader.fieldnames or []):
            raise ValueError(f"{labels} has no 'file' column (columns: {', '.join(reader.fieldnames or []) or 'none'})")
        out = []
        for row in reader:
            name = (row.get("file") or "").strip()
            if not name:
                raise ValueError(f"{labels} line {reader.line_num}: no file named in the 'file' column")
            text = (row.get("class_index") or "-1").strip() if "class_index" in reader.fieldnames else "-1"
            try:
                label = int(text)
            except ValueError:
                label = -2
            if label < -1:
                raise ValueError(f"{labels} line {reader.line_num}: class_index {text!r} is not a class number "
                                 "(an integer >= 0, or -1 for unknown)")
            out.append((labels.parent / name, label))
    return out


def preprocess(img, size: int = 224, resize: Optional[int] = None, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Resize the shorter side to ``resize`` (default size*256/224), centre-crop, normalise."""
    from PIL import Image
    resize = resize or int(round(size * 256 / 224))
    img = img.convert("RGB")
    w, h = img.size
    s = resize / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    t = t.permute(2, 0, 1).float() / 255.0
    return (t - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


class ImageTooLarge(ValueError):
    """An image that declares more pixels than PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``)."""


def open_image(path: str | Path, size: int = 224, **kw) -> torch.Tensor:
    """One preprocessed image [3, size, size]. ValueError naming the file when it cannot be read, or
    when it declares more pixels than PIL's decompression-bomb limit (it is not decoded then)."""
    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return preprocess(im, size, **kw)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(f"image {path} is too large to decode safely ({e})") from None
    except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"image {path} could not be read ({e})") from None


def load_images(folder: str | Path, limit: Optional[int] = None, size: int = 224, **kw):
    """(images [N, 3, size, size], labels [N], skipped count) of the first ``limit`` images (all: None).
    Unreadable images are skipped; one too large to decode safely is skipped with a warning."""
    if limit is not None and limit < 1:
        raise ValueError(f"image limit must be >= 1, got {limit}")
    items = list_images(folder)[:limit]
    if not items:
        raise no_images(folder)
    xs, ys, skipped = [], [], 0
    for path, label in items:
        try:
            xs.append(open_image(path, size, **kw))
            ys.append(label)
        except ImageTooLarge as e:
            warnings.warn(f"skipped {e}", stacklevel=2)
            skipped += 1
        except ValueError:
            skipped += 1
    if not xs:
        raise ValueError(f"no readable images in {folder} ({skipped} skipped)")
    return torch.stack(xs), torch.tensor(ys), skipped


def batches(x: torch.Tensor, batch: int):
    """Full batches only (static shapes)."""
    return [x[i:i + batch] for i in range(0, len(x) - batch + 1, batch)]
