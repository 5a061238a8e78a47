"""PascalVOC reader: a VOCdevkit root and image sets, every annotation read and checked up front.

An image set is ``<year>_<split>`` (``VOCdevkit/VOC<year>/ImageSets/Main/<split>.txt``) or, as the
reference's data folder has them, a list file of ``<image path> <annotation path>`` lines relative to the
data folder (``trainval.txt``, ``test.txt``). Labels index a label list whose entry 0 is ``background``;
by default the 20 VOC classes follow in alphabetical order, and a ``label_list`` file overrides them.

Every annotation is parsed when the data set is built, so an unreadable XML or a missing image stops the
run before any training, with a ``DatasetError`` naming the file. A box with ``xmax <= xmin`` or
``ymax <= ymin`` is dropped with a message in ``problems`` naming the file and the object (the command
line prints them and their count). As the reference, an image left without boxes is skipped, and boxes
are normalised by the size of the image itself (not the XML's ``<size>``), unclipped.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

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


class Item(NamedTuple):
    image: Path
    annotation: Path
    image_id: str


def _image_set_items(data_dir: Path, name: str) -> list[Item]:
    """The items of one image set: a list file (``*.txt``) or ``<year>_<split>``."""
    if name.endswith(".txt"):
        list_file = Path(name) if Path(name).is_absolute() else data_dir / name
        if not list_file.is_file():
            raise DatasetError(f"image list {list_file} does not exist")
        items = []
        for number, line in enumerate(list_file.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise DatasetError(f"{list_file} line {number}: expected '<image> <annotation>', got {line!r}")
            image, annotation = (data_dir / p for p in parts)
            items.append(Item(image, annotation, image.stem))
        return items
    year, sep, split = name.partition("_")
    if not sep or not year or not split:
        raise DatasetError(f"image set {name!r} is neither a list file (*.txt) nor of the form <year>_<split>, "
                           "e.g. 2007_trainval")
    folder = find_devkit(data_dir) / f"VOC{year}"
    list_file = folder / "ImageSets" / "Main" / f"{split}.txt"
    if not list_file.is_file():
        raise DatasetError(f"image set {name!r}: list file {list_file} does not exist")
    ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    return [Item(folder / "JPEGImages" / f"{i}.jpg", folder / "Annotations" / f"{i}.xml", i) for i in ids]


@dataclass(frozen=True)
class Annotation:
    boxes: np.ndarray       # [K, 4] float32, xmin ymin xmax ymax in pixels as written in the XML
    labels: np.ndarray      # [K] int64, 1-based (0 is background)
    difficult: np.ndarray   # [K] bool

    def normalised_boxes(self, width: int, height: int) -> np.ndarray:
        return self.boxes / np.array([width, height, width, height], dtype=np.float32)

    def without_difficult(self) -> "Annotation":
        keep = ~self.difficult
        return Annotation(self.boxes[keep], self.labels[keep], self.difficult[keep])


def parse_annotation(xml_path: Path, class_index: dict[str, int], problems: list[str] | None = None) -> Annotation:
    """Objects of one VOC XML. Degenerate boxes are dropped, with a message appended to ``problems``."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise DatasetError(f"cannot read annotation {xml_path}: {exc}") from exc
    boxes, labels, difficult = [], [], []
    for number, obj in enumerate(root.iter("object"), 1):
        name = (obj.findtext("name") or "").strip()
        where = f"annotation {xml_path}, object {number} ({name or 'no name'})"
        if name not in class_index:
            raise DatasetError(f"{where}: class {name!r} is not in the label list")
        try:
            box = [float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            hard = int(float((obj.findtext("difficult") or "0").strip() or 0)) == 1
        except (AttributeError, TypeError, ValueError) as exc:
            raise DatasetError(f"{where}: cannot read its bndbox / difficult ({exc})") from exc
        if box[2] <= box[0] or box[3] <= box[1]:
            if problems is not None:
                problems.append(f"{where}: degenerate box xmin {box[0]:g} ymin {box[1]:g} xmax {box[2]:g} "
                                f"ymax {box[3]:g} (needs xmax > xmin and ymax > ymin); box dropped")
            continue
        boxes.append(box)
        labels.append(class_index[name])
        difficult.append(hard)
    return Annotation(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64),
                      np.asarray(difficult, dtype=bool))


def load_rgb(path: Path) -> Image.Image:
    """The image as 8-bit RGB (greyscale, palette and alpha images converted), fully decoded."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


class Sample(NamedTuple):
    """What the data set yields with a transform: the transform's output and the sample's index."""

    index: int
    image: object
    boxes: object
    labels: object
    difficult: object
    dropped: bool


class VOCDataset:
    """Samples of one or more image sets.

    Without a transform: (PIL RGB image, boxes [K,4] normalised, labels [K], difficult [K]). With one:
    a ``Sample`` of ``transform(image, boxes, labels, difficult, rng)``, where ``rng`` is a numpy Generator
    derived from (seed, epoch, index), so augmentation does not depend on the number of loader workers.
    """

    def __init__(self, data_dir: str | os.PathLike, image_sets: Sequence[str] | str,
                 label_list: Sequence[str] | None = None, transform: Callable | None = None,
                 seed: int = 0, keep_difficult: bool = True):
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise DatasetError(f"data directory {data_dir} does not exist")
        if isinstance(image_sets, str):
            image_sets = [s for s in image_sets.split(",") if s]
        if not image_sets:
            raise DatasetError("no image set given")
        self.labels = list(label_list) if label_list is not None else resolve_label_list(data_dir)
        self.class_index = {name: i for i, name in enumerate(self.labels)}
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.problems: list[str] = []           # dropped degenerate boxes, one message each
        self.degenerate_boxes = 0
        self.skipped: list[str] = []            # image ids left without any box
        items = [item for name in image_sets for item in _image_set_items(data_dir, name)]
        if not items:
            raise DatasetError(f"image sets {list(image_sets)} under {data_dir} list no images")
        self.items: list[Item] = []
        self.annotations: list[Annotation] = []
        for item in items:
            if not item.image.is_file():
                raise DatasetError(f"image {item.image} does not exist (listed in image sets {list(image_sets)})")
            if not item.annotation.is_file():
                raise DatasetError(f"annotation {item.annotation} does not exist (listed in image sets "
                                   f"{list(image_sets)})")
            before = len(self.problems)
            ann = parse_annotation(item.annotation, self.class_index, self.problems)
            self.degenerate_boxes += len(self.problems) - before
            if not keep_difficult:
                ann = ann.without_difficult()
            if len(ann.labels) == 0:
                self.skipped.append(item.image_id)
                continue
            self.items.append(item)
            self.annotations.append(ann)
        if not self.items:
            raise DatasetError(f"image sets {list(image_sets)} under {data_dir}: no image has a usable box")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def image_path(self, index: int) -> Path:
        return self.items[index].image

    def annotation(self, index: int) -> Annotation:
        return self.annotations[index]

    def report(self) -> list[str]:
        """Lines for the user: every dropped box, then the counts."""
        lines = list(self.problems)
        if self.degenerate_boxes:
            lines.append(f"{self.degenerate_boxes} degenerate box(es) dropped (listed above)")
        if self.skipped:
            shown = ", ".join(self.skipped[:5]) + (" ..." if len(self.skipped) > 5 else "")
            lines.append(f"{len(self.skipped)} image(s) without any box skipped, as the reference does: {shown}")
        return lines

    def __getitem__(self, index: int):
        ann = self.annotations[index]
        image = load_rgb(self.items[index].image)
        boxes = ann.normalised_boxes(*image.size)
        if self.transform is None:
            return image, boxes, ann.labels, ann.difficult
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return Sample(index, *self.transform(image, boxes, ann.labels, ann.difficult, rng))
