"""Image folders for calibration and evaluation (no downloads): a flat folder with ``labels.csv``
(``file,class_index,...``) or ImageNet-style class subfolders."""
from __future__ import annotations

import csv
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


def list_images(folder: str | Path) -> list[tuple[Path, int]]:
    """(path, label) pairs; label -1 when unknown. Missing folder: FileNotFoundError naming it."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    labels = root / "labels.csv"
    if labels.exists():
        return _read_labels(labels)
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    if subdirs:
        return [(p, i) for i, d in enumerate(subdirs) for p in sorted(d.iterdir()) if p.suffix.lower() in EXTS]
    return [(p, -1) for p in sorted(root.iterdir()) if p.suffix.lower() in EXTS]


def _read_labels(labels: Path) -> list[tuple[Path, int]]:
    """``labels.csv``'s (path, class index) rows; ValueError naming the file, and the line of a bad index."""
    with open(labels, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "file" not in (reader.fieldnames or []):
            raise ValueError(f"{labels} has no 'file' column (columns: {', '.join(reader.fieldnames or []) or 'none'})")
        out = []
        for row in reader:
            text = (row.get("class_index") or "-1").strip() if "class_index" in reader.fieldnames else "-1"
            try:
                label = int(text)
            except ValueError:
                label = -2
            if label < -1:
                raise ValueError(f"{labels} line {reader.line_num}: class_index {text!r} is not a class number "
                                 "(an integer >= 0, or -1 for unknown)")
            out.append((labels.parent / row["file"], label))
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
