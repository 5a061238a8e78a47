"""A generated VOCdevkit-format dataset of solid-coloured shapes, so every command runs without a download.

Each class is one shape drawn in its own colour (with a little jitter) on a mildly textured, desaturated
background; 1-4 objects per image, mostly large (SSD's smallest prior is 60/300 of the image), some small.
Objects smaller than ``DIFFICULT_SIZE`` pixels are flagged difficult, as VOC does for hard objects.
Everything is a function of the seed: the same seed writes the same files.
"""
from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageDraw

from .transforms import IMAGE_SIZE
from .voc import BACKGROUND, LABEL_LIST_FILE

YEAR = "synthetic"                 # image sets are "synthetic_trainval" and "synthetic_test"
TRAIN_SET, TEST_SET = f"{YEAR}_trainval", f"{YEAR}_test"
DIFFICULT_SIZE = 36

# class name -> RGB colour; shapes and colours both differ between classes
CLASSES = {
    "circle": (220, 40, 40),
    "square": (40, 180, 60),
    "triangle": (40, 80, 230),
    "diamond": (240, 200, 30),
    "cross": (200, 50, 220),
}


def _background(rng, size: int) -> np.ndarray:
    base = rng.uniform(90, 170)
    tint = rng.uniform(-12, 12, size=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    gradient = rng.uniform(-25, 25) * xx + rng.uniform(-25, 25) * yy
    noise = rng.normal(0.0, 8.0, size=(size, size, 3))
    image = base + tint + gradient[..., None] + noise
    return np.clip(image, 0, 255).astype(np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, box, colour) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if name == "circle":
        draw.ellipse(box, fill=colour)
    elif name == "square":
        draw.rectangle(box, fill=colour)
    elif name == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    elif name == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
    elif name == "cross":
        tw, th = (x1 - x0) / 3, (y1 - y0) / 3
        draw.rectangle((x0 + tw, y0, x1 - tw, y1), fill=colour)
        draw.rectangle((x0, y0 + th, x1, y1 - th), fill=colour)
    else:
        raise ValueError(f"unknown shape {name!r}")


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def make_image(rng, size: int = IMAGE_SIZE):
    """One image and its objects: list of (class name, (xmin, ymin, xmax, ymax) pixels, difficult)."""
    image = Image.fromarray(_background(rng, size))
    draw = ImageDraw.Draw(image)
    names = list(CLASSES)
    objects = []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(30):
            side = rng.uniform(0.1, 0.2) if rng.random() < 0.2 else rng.uniform(0.2, 0.55)
            w = side * size * rng.uniform(0.8, 1.25)
            h = side * size * rng.uniform(0.8, 1.25)
            w, h = min(w, size - 2), min(h, size - 2)
            x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
            box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
            if all(_iou(box, other) < 0.1 for _, other, _ in objects):
                break
        else:
            continue
        name = names[int(rng.integers(len(names)))]
        colour = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in CLASSES[name])
        _draw_shape(draw, name, box, colour)
        difficult = min(box[2] - box[0], box[3] - box[1]) < DIFFICULT_SIZE
        objects.append((name, box, difficult))
    return image, objects


def _annotation_xml(image_id: str, size: int, objects) -> str:
    parts = [f"<annotation>\n\t<folder>VOC{YEAR}</folder>\n\t<filename>{image_id}.jpg</filename>\n"
             f"\t<size>\n\t\t<width>{size}</width>\n\t\t<height>{size}</height>\n\t\t<depth>3</depth>\n"
             "\t</size>\n"]
    for name, (x0, y0, x1, y1), difficult in objects:
        # VOC pixel coordinates are 1-based and inclusive
        parts.append(f"\t<object>\n\t\t<name>{escape(name)}</name>\n\t\t<difficult>{int(difficult)}"
                     f"</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{x0 + 1}</xmin>\n\t\t\t<ymin>{y0 + 1}</ymin>\n"
                     f"\t\t\t<xmax>{x1 + 1}</xmax>\n\t\t\t<ymax>{y1 + 1}</ymax>\n\t\t</bndbox>\n\t</object>\n")
    parts.append("</annotation>\n")
    return "".join(parts)


def generate(out_dir: str | Path, seed: int = 0, train: int = 600, test: int = 150,
             size: int = IMAGE_SIZE) -> Path:
    """Write ``out_dir/VOCdevkit/VOCsynthetic`` and ``out_dir/label_list``; returns ``out_dir``."""
    out = Path(out_dir)
    root = out / "VOCdevkit" / f"VOC{YEAR}"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for split_code, (split, count) in enumerate((("trainval", train), ("test", test))):
        ids = []
        for i in range(count):
            image_id = f"{split}_{i:05d}"
            image, objects = make_image(np.random.default_rng([seed, split_code, i]), size)
            image.save(root / "JPEGImages" / f"{image_id}.jpg", quality=92)
            (root / "Annotations" / f"{image_id}.xml").write_text(_annotation_xml(image_id, size, objects))
            ids.append(image_id)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    (out / LABEL_LIST_FILE).write_text("\n".join([BACKGROUND, *CLASSES]) + "\n")
    return out


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write the synthetic shapes dataset in VOCdevkit format.")
    parser.add_argument("--out", required=True, help="output folder (gets VOCdevkit/ and label_list)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=600, help="trainval images")
    parser.add_argument("--test", type=int, default=150, help="test images")
    parser.add_argument("--size", type=int, default=IMAGE_SIZE, help="image side in pixels")
    args = parser.parse_args(argv)
    if args.train < 0 or args.test < 0 or args.size < 64:
        parser.error("--train/--test must be >= 0 and --size >= 64")
    out = generate(args.out, args.seed, args.train, args.test, args.size)
    print(f"wrote {args.train} trainval + {args.test} test images to {out} "
          f"(image sets {TRAIN_SET}, {TEST_SET})")


if __name__ == "__main__":
    main()
