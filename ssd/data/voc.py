"""PascalVOC reader: a VOCdevkit root, image sets such as ``2007_trainval``, boxes normalised by size.

An image set name ``<year>_<split>`` means ``VOCdevkit/VOC<year>/ImageSets/Main/<split>.txt``. Labels are
indices into a label list whose entry 0 is ``background``; by default the 20 VOC classes follow in
alphabetical order, and a ``label_list`` file (one name per line) overrides them.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

BACKGROUND = "background"
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
LABEL_LIST_FILE = "label_list"


class DatasetError(RuntimeError):
    """A data directory, image set, annotation or image that cannot be read; the message names the file."""


def default_label_list() -> list[str]:
    return [BACKGROUND, *VOC_CLASSES]


def read_label_list(path: str | os.PathLike) -> list[str]:
    """Class names from a file, one per line; ``background`` is put first when the file leaves it out."""
    path = Path(path)
    try:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise DatasetError(f"cannot read label list {path}: {exc}") from exc
    if not names:
        raise DatasetError(f"label list {path} is empty")
    if names[0] != BACKGROUND:
        names.insert(0, BACKGROUND)
    if len(set(names)) != len(names):
        raise DatasetError(f"label list {path} repeats a class name")
    return names


def find_devkit(data_dir: str | os.PathLike) -> Path:
    """The VOCdevkit folder: ``data_dir/VOCdevkit`` when present, else ``data_dir`` itself."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"data directory {root} does not exist")
    return root / "VOCdevkit" if (root / "VOCdevkit").is_dir() else root


def resolve_label_list(data_dir: str | os.PathLike, label_list: str | os.PathLike | None = None) -> list[str]:
    """An explicit label list file, else ``<data_dir>/label_list`` when present, else the VOC classes."""
    if label_list is not None:
        return read_label_list(label_list)
    for candidate in (Path(data_dir) / LABEL_LIST_FILE, Path(data_dir) / "VOCdevkit" / LABEL_LIST_FILE):
        if candidate.is_file():
            return read_label_list(candidate)
    return default_label_list()


def split_image_set(name: str) -> tuple[str, str]:
    """``2007_trainval`` -> (``VOC2007``, ``trainval``)."""
    year, sep, split = name.partition("_")
    if not sep or not year or not split:
        raise DatasetError(f"image set {name!r} is not of the form <year>_<split>, e.g. 2007_trainval")
    return f"VOC{year}", split


@dataclass(frozen=True)
class Annotation:
    width: int
    height: int
    boxes: np.ndarray       # [K, 4] float32, xmin ymin xmax ymax normalised to [0, 1]
    labels: np.ndarray      # [K] int64, 1-based (0 is background)
    difficult: np.ndarray   # [K] bool


def parse_annotation(xml_path: Path, class_index: dict[str, int]) -> Annotation:
    try:
        root = ET.parse(xml_path).getroot()
        size = root.find("size")
        width = int(float(size.findtext("width")))
        height = int(float(size.findtext("height")))
        boxes, labels, difficult = [], [], []
        for obj in root.iter("object"):
            name = obj.findtext("name").strip()
            if name not in class_index:
                raise DatasetError(f"class {name!r} is not in the label list")
            bnd = obj.find("bndbox")
            box = [float(bnd.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            boxes.append(box)
            labels.append(class_index[name])
            difficult.append(int(obj.findtext("difficult", "0").strip() or 0) == 1)
    except DatasetError as exc:
        raise DatasetError(f"annotation {xml_path}: {exc}") from exc
    except (OSError, ET.ParseError, AttributeError, TypeError, ValueError) as exc:
        raise DatasetError(f"cannot read annotation {xml_path}: {exc!r}") from exc
    if width <= 0 or height <= 0:
        raise DatasetError(f"annotation {xml_path}: image size {width}x{height} is not positive")
    boxes_np = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    boxes_np /= np.array([width, height, width, height], dtype=np.float32)
    boxes_np = np.clip(boxes_np, 0.0, 1.0)
    return Annotation(width, height, boxes_np, np.asarray(labels, dtype=np.int64),
                      np.asarray(difficult, dtype=bool))


def load_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except OSError as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


class VOCDataset:
    """Samples of (image HWC uint8 RGB, boxes [K,4], labels [K], difficult [K]) after ``transform``.

    ``transform(image, boxes, labels, difficult, rng)`` receives a numpy Generator derived from
    (seed, epoch, index), so augmentation is deterministic whatever the number of loader workers.
    """

    def __init__(self, data_dir: str | os.PathLike, image_sets: Sequence[str] | str,
                 label_list: Sequence[str] | None = None, transform: Callable | None = None,
                 seed: int = 0, keep_difficult: bool = True):
        self.devkit = find_devkit(data_dir)
        if isinstance(image_sets, str):
            image_sets = [s for s in image_sets.split(",") if s]
        if not image_sets:
            raise DatasetError("no image set given")
        self.labels = list(label_list) if label_list is not None else resolve_label_list(data_dir)
        self.class_index = {name: i for i, name in enumerate(self.labels)}
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.keep_difficult = keep_difficult
        self.items: list[tuple[Path, str]] = []   # (VOC<year> folder, image id)
        for name in image_sets:
            folder, split = split_image_set(name)
            list_file = self.devkit / folder / "ImageSets" / "Main" / f"{split}.txt"
            if not list_file.is_file():
                raise DatasetError(f"image set {name!r}: list file {list_file} does not exist")
            ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
            self.items.extend((self.devkit / folder, image_id) for image_id in ids)
        if not self.items:
            raise DatasetError(f"image sets {list(image_sets)} under {self.devkit} list no images")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def image_path(self, index: int) -> Path:
        folder, image_id = self.items[index]
        return folder / "JPEGImages" / f"{image_id}.jpg"

    def annotation(self, index: int) -> Annotation:
        folder, image_id = self.items[index]
        ann = parse_annotation(folder / "Annotations" / f"{image_id}.xml", self.class_index)
        if not self.keep_difficult:
            keep = ~ann.difficult
            ann = Annotation(ann.width, ann.height, ann.boxes[keep], ann.labels[keep], ann.difficult[keep])
        return ann

    def __getitem__(self, index: int):
        ann = self.annotation(index)
        path = self.image_path(index)
        image = load_rgb(path)
        if image.shape[0] != ann.height or image.shape[1] != ann.width:
            raise DatasetError(f"image {path} is {image.shape[1]}x{image.shape[0]} but its annotation "
                               f"says {ann.width}x{ann.height}")
        if self.transform is None:
            return image, ann.boxes, ann.labels, ann.difficult
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return self.transform(image, ann.boxes, ann.labels, ann.difficult, rng)
