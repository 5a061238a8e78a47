"""Inference on image files and drawing of the detections (the infer mode).

A model (training checkpoint or saved inference model; a QAT checkpoint is frozen first) runs on each
image resized to 300x300 with Lanczos, as the reference's infer reader; the detections above
--confs_threshold are drawn on a copy of the image at its own size, written atomically to --output_dir.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageDraw

from .checkpoint import atomic_write, make_transpiler, model_from_checkpoint, read_checkpoint
from .config import Config, UsageError
from .data import load_rgb, resolve_label_list, to_network_input
from .data.transforms import MEAN_BGR, resize
from .postprocess import detection_output
from .priors import prior_boxes
from .runtime import Runtime

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40))


def inference_model(path) -> tuple[torch.nn.Module, list[str] | None]:
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt).eval()
    if ckpt["stage"] == "qat":
        make_transpiler(ckpt["quant"]).freeze_program(model)
    return model, ckpt.get("labels")


def images_at(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise UsageError(f"--image_path {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        return files
    if not path.is_file():
        raise UsageError(f"--image_path {path} does not exist")
    return [path]


@torch.no_grad()
def detect(model: torch.nn.Module, image: Image.Image, device, mean_bgr=MEAN_BGR,
           score_threshold: float = 0.01) -> torch.Tensor:
    """Detections [K, 6] (label, score, xmin, ymin, xmax, ymax in pixels of the given image)."""
    x = to_network_input(resize(image), mean_bgr).unsqueeze(0).to(device)
    locs, confs = model(x)
    det = detection_output(locs, confs, prior_boxes().to(device), score_threshold=score_threshold)[0].cpu()
    w, h = image.size
    det[:, 2:] = det[:, 2:].clamp(0.0, 1.0) * torch.tensor([w, h, w, h], dtype=det.dtype)
    return det


def draw_detections(image: Image.Image, detections: torch.Tensor, labels: list[str]) -> Image.Image:
    image = image.copy()
    draw = ImageDraw.Draw(image)
    width = max(2, round(min(image.size) / 150))
    for label, score, x0, y0, x1, y1 in detections.tolist():
        colour = PALETTE[int(label) % len(PALETTE)]
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        text = f"{labels[int(label)]} {score:.2f}"
        tx, ty = x0 + width, max(0.0, y0 - 12)
        draw.rectangle(draw.textbbox((tx, ty), text), fill=colour)
        draw.text((tx, ty), text, fill=(255, 255, 255))
    return image


def infer(cfg: Config, rt: Runtime, log: Callable[[str], None] = lambda _: None) -> dict:
    files = images_at(Path(cfg.image_path))
    model, labels = inference_model(cfg.init_model)
    if cfg.label_list or not labels:
        labels = resolve_label_list(cfg.data_dir if Path(cfg.data_dir).is_dir() else ".", cfg.label_list)
    if len(labels) != model.num_classes:
        raise UsageError(f"the model has {model.num_classes} classes but the label list has {len(labels)}")
    model.to(rt.device)
    out_dir = Path(cfg.output_dir)
    results = {}
    for path in files:
        image = load_rgb(path)
        det = detect(model, image, rt.device, cfg.mean_BGR)
        det = det[det[:, 1] >= cfg.confs_threshold]
        target = out_dir / f"{path.stem}_detections.jpg"
        drawn = draw_detections(image, det, labels)
        atomic_write(target, lambda tmp: drawn.save(tmp, format="JPEG", quality=92))
        results[str(path)] = {"detections": det, "output": str(target)}
        log(f"{path}: {len(det)} detection(s) -> {target}")
        for label, score, x0, y0, x1, y1 in det.tolist():
            log(f"  {labels[int(label)]:<14} {score:.3f}  [{x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f}]")
    return results
