"""Training and evaluation: the reference's train() and test() loops, and the test mode.

train: build (or load --init_model), transpile for QAT unless --act_quant_type none, test the transpiled
model once (epoch 0, as the reference prints it), then per epoch train with the reference's RMSProp and
piecewise learning rate, evaluate mAP, and write ``last.pt`` (and ``best.pt`` when the mAP improves)
atomically; --resume continues from ``last.pt`` exactly (data order and augmentation are functions of
the seed and the epoch). Under torchrun every process trains its share of each batch (DDP) and
evaluates its share of the test batches; rank 0 writes.

test: evaluate a checkpoint: the float model as is, a QAT model frozen and, with --int8, as real int8;
with --model_save_dir the inference models are written there (``float.pt`` / ``frozen.pt`` / ``int8.pt``).

Results go back as dicts; ``log`` (a callable, rank 0 only) receives the progress lines.
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import (CheckpointError, atomic_save, build_model, load_state_strict, make_transpiler,
                         model_from_checkpoint, model_record, read_checkpoint)
from .config import Config, UsageError
from .data import build_datasets, eval_loader, set_loader_epoch, train_loader
from .loss import MultiBoxLoss
from .metrics import DetectionMAP
from .optim import learning_rate, make_optimizer, set_learning_rate
from .postprocess import detection_output
from .priors import prior_boxes
from .runtime import Runtime, rng_state, seed_everything, set_rng_state

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def preferred_layout(model: torch.nn.Module, device: torch.device) -> torch.memory_format:
    """channels_last for a float model on CPU: oneDNN runs its convolutions (the depthwise ones above all)
    about 1.7x faster in training there. Quantized models keep their own layout handling."""
    quantized = any(type(m).__module__.startswith("qkernels") for m in model.modules())
    if device.type == "cpu" and not quantized:
        return torch.channels_last
    return torch.contiguous_format


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _progress(iterable, enabled: bool, desc: str, total=None):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, mininterval=1.0, dynamic_ncols=True)


def median_ms_per_image(batch_times: list[list[tuple[float, int]]], warmup: int = 1) -> float:
    """Median over batches of the forward time per image (ms). ``batch_times`` holds each process's
    (seconds, images) per batch; the first ``warmup`` batches of each (first-call allocations, weight
    packing) are left out unless nothing would be left."""
    timed = [t for times in batch_times for t in (times[warmup:] or times)]
    return statistics.median(1000.0 * s / n for s, n in timed) if timed else math.nan


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, num_classes: int, device: torch.device, rt: Runtime | None = None,
             ap_version: str = "11point", progress: bool = False, desc: str = "eval") -> dict:
    """mAP over the whole test set and the model's forward time per image (median over batches).

    Each process runs its share of the batches; rank 0 gathers the detections, adds the images in
    data-set order (so the result does not depend on the number of processes) and computes the mAP,
    which every process gets back. ``metric`` is the DetectionMAP on rank 0, None elsewhere."""
    was_training = model.training
    model.eval()
    priors = prior_boxes().to(device)
    layout = preferred_layout(model, device)
    records, times = [], []
    for batch in _progress(loader, progress, desc):
        images = batch.images.to(device).contiguous(memory_format=layout)
        _sync(device)
        start = time.perf_counter()
        locs, confs = model(images)
        _sync(device)
        times.append((time.perf_counter() - start, images.shape[0]))
        for index, det, boxes, labels, difficult in zip(batch.indices, detection_output(locs, confs, priors),
                                                        batch.boxes, batch.labels, batch.difficult):
            records.append((index, det.cpu(), boxes, labels, difficult))
    model.train(was_training)
    gathered = rt.gather((records, times)) if rt is not None else [(records, times)]
    result = None
    metric = None
    if gathered is not None:
        metric = DetectionMAP(num_classes, overlap_threshold=0.5, evaluate_difficult=False, ap_version=ap_version)
        for _, det, boxes, labels, difficult in sorted((r for part, _ in gathered for r in part),
                                                       key=lambda r: r[0]):
            metric.update(det, boxes, labels, difficult)
        result = (float(metric.accumulate()), median_ms_per_image([part for _, part in gathered]))
    if rt is not None:
        result = rt.broadcast(result)
    return {"map": result[0], "ms_per_image": result[1], "metric": metric}


# ----------------------------------------------------------------------------- training
def _datasets(cfg: Config, need_train: bool, log: Log):
    labels, train_ds, test_ds = build_datasets(cfg.data_dir, cfg.train_sets, cfg.test_sets, cfg.label_list,
                                               cfg.augment, cfg.mean_BGR, cfg.image_size, cfg.seed, need_train)
    for name, ds in (("training", train_ds), ("test", test_ds)):
        if ds is not None:
            for line in ds.report():
                log(f"{name} data: {line}")
    return labels, train_ds, test_ds


def _initial_model(cfg: Config, labels: list[str], log: Log):
    """The model to train and its quantization settings: float (or --init_model), then transpiled."""
    quant = cfg.quant()
    model = build_model(len(labels), None, "float")
    if cfg.init_model:
        ckpt = read_checkpoint(cfg.init_model)
        if ckpt["num_classes"] != len(labels):
            raise CheckpointError(f"--init_model {cfg.init_model} has {ckpt['num_classes']} classes but the label "
                                  f"list has {len(labels)} ({', '.join(labels[:4])}, ...)")
        if ckpt["stage"] not in ("float", "qat"):
            raise CheckpointError(f"--init_model {cfg.init_model} is a {ckpt['stage']} inference model; "
                                  "training starts from a float or QAT checkpoint")
        if ckpt["stage"] == "qat":
            if quant != ckpt["quant"]:
                raise CheckpointError(f"--init_model {cfg.init_model} was trained with {ckpt['quant']}; "
                                      f"this run asks for {quant}: start from the float checkpoint instead")
            make_transpiler(quant).training_transpile(model)
        load_state_strict(model, ckpt["model"], f"--init_model {cfg.init_model}")
        log(f"loaded {ckpt['stage']} weights from {cfg.init_model}")
        if ckpt["stage"] == "qat":
            return model, quant
    if quant is not None:
        make_transpiler(quant).training_transpile(model)
    return model, quant


def _check_batch(cfg: Config, rt: Runtime, images: int) -> None:
    if cfg.batch_size % rt.world_size:
        raise UsageError(f"--batch_size {cfg.batch_size} does not split evenly over {rt.world_size} processes "
                         "(each trains an equal share of every batch)")
    if cfg.batch_size // rt.world_size < 2 or images < 2:
        # batch norm cannot train on one value per channel (the last feature map is 1x1)
        raise UsageError(f"--batch_size {cfg.batch_size} over {rt.world_size} process(es) with {images} training "
                         "images: every process needs batches of at least 2 images")


def train(cfg: Config, rt: Runtime, log: Log = _quiet) -> dict:
    seed_everything(cfg.seed)
    labels, train_ds, test_ds = _datasets(cfg, need_train=True, log=log)
    _check_batch(cfg, rt, len(train_ds))
    model, quant = _initial_model(cfg, labels, log)
    stage = "float" if quant is None else "qat"
    model.to(rt.device).train()
    layout = preferred_layout(model, rt.device)
    model.to(memory_format=layout)
    optimizer = make_optimizer(model, learning_rate(cfg.learning_rate, cfg.lr_epochs, cfg.lr_decay_rates, 0),
                               cfg.body_lr_multiplier)
    save_dir = Path(cfg.model_save_dir)
    start_epoch, history, best = 0, [], {"map": -1.0, "epoch": -1}
    if cfg.resume:
        last = save_dir / "last.pt"
        if not last.is_file():
            raise CheckpointError(f"--resume: {last} does not exist (nothing to resume in --model_save_dir)")
        ckpt = read_checkpoint(last)
        if ckpt["stage"] != stage or ckpt.get("quant") != quant:
            raise CheckpointError(f"--resume: {last} is a {ckpt['stage']} run with {ckpt.get('quant')}, "
                                  f"this run is {stage} with {quant}")
        load_state_strict(model, ckpt["model"], f"--resume {last}")
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, history, best = ckpt["epoch"], ckpt["history"], ckpt["best"]
        set_rng_state(ckpt["rng"])
        log(f"resuming {last} after epoch {start_epoch}")

    train_dl = train_loader(train_ds, cfg.batch_size, cfg.seed, rt.rank, rt.world_size, cfg.num_workers)
    test_dl = eval_loader(test_ds, cfg.eval_batch, rt.rank, rt.world_size, cfg.num_workers)
    criterion = MultiBoxLoss(len(labels)).to(rt.device)
    net = rt.data_parallel(model)
    show = rt.is_main and not cfg.quiet
    log(f"training {stage}{'' if quant is None else ' ' + str(quant)}: {len(train_ds)} images, "
        f"{cfg.epoc_num} epochs, batch {cfg.batch_size} on {rt.world_size} process(es), {rt.device}; "
        f"test batch {cfg.eval_batch}")

    def test_now(epoch: int) -> float:
        rt.share_buffers(model)
        r = evaluate(model, test_dl, len(labels), rt.device, rt, cfg.ap_version, show, f"test epoch {epoch}")
        return r["map"]

    if quant is not None and start_epoch == 0:
        # the reference tests the transpiled model before QAT starts
        history.append({"epoch": 0, "map": test_now(0)})
        log(f"epoch 0 (transpiled, before QAT): mAP {history[-1]['map']:.4f}")

    for epoch in range(start_epoch, cfg.epoc_num):
        lr = learning_rate(cfg.learning_rate, cfg.lr_epochs, cfg.lr_decay_rates, epoch)
        set_learning_rate(optimizer, lr)
        set_loader_epoch(train_dl, epoch)
        net.train()
        loss_sum, steps, seen, dropped = 0.0, 0, 0, 0
        start = time.perf_counter()
        bar = _progress(train_dl, show, f"epoch {epoch + 1}/{cfg.epoc_num}", total=len(train_dl))
        for batch in bar:
            images = batch.images.to(rt.device, non_blocking=True).contiguous(memory_format=layout)
            boxes = [b.to(rt.device) for b in batch.boxes]
            gt_labels = [lab.to(rt.device) for lab in batch.labels]
            locs, confs = net(images)
            loss = criterion(locs, confs, boxes, gt_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value} at epoch {epoch + 1}; "
                                         f"try a lower --learning_rate than {cfg.learning_rate}")
            loss_sum, steps = loss_sum + value, steps + 1
            seen, dropped = seen + images.shape[0], dropped + batch.dropped
            if show:
                bar.set_postfix(loss=f"{loss_sum / steps:.3f}", lr=f"{lr:.2g}")
        train_s = time.perf_counter() - start
        loss_sum, steps, seen, dropped = rt.sum(loss_sum, steps, seen, dropped)
        record = {"epoch": epoch + 1, "loss": loss_sum / max(steps, 1), "lr": lr,
                  "images_per_s": seen / max(train_s, 1e-9), "dropped": int(dropped)}
        record["map"] = test_now(epoch + 1)
        history.append(record)
        improved = record["map"] > best["map"]
        if improved:
            best = {"map": record["map"], "epoch": epoch + 1}
        if rt.is_main:
            checkpoint = model_record(model, stage, quant, labels)
            checkpoint.update(optimizer=optimizer.state_dict(), epoch=epoch + 1, history=history, best=best,
                              rng=rng_state(), config=cfg.as_dict())
            if improved:
                atomic_save(checkpoint, save_dir / "best.pt")
            atomic_save(checkpoint, save_dir / "last.pt")
        log(f"epoch {epoch + 1}/{cfg.epoc_num}: loss {record['loss']:.4f} lr {lr:.3g} "
            f"{record['images_per_s']:.1f} img/s ({train_s:.0f} s), {record['dropped']} crop(s) without a box "
            f"left out, mAP {record['map']:.4f}")
        rt.barrier()
    dropped_boxes = train_ds.degenerate_boxes + test_ds.degenerate_boxes
    if dropped_boxes:
        log(f"{dropped_boxes} degenerate box(es) were dropped from the data (listed at the start)")
    return {"history": history, "best": best, "last": str(save_dir / "last.pt"),
            "best_path": str(save_dir / "best.pt"), "stage": stage, "quant": quant,
            "degenerate_boxes": dropped_boxes}


# ----------------------------------------------------------------------------- test
def test(cfg: Config, rt: Runtime, log: Log = _quiet) -> dict:
    """Evaluate a checkpoint: the float model as is; a QAT model frozen (and, with --int8, as int8)."""
    labels, _, test_ds = _datasets(cfg, need_train=False, log=log)
    ckpt = read_checkpoint(cfg.init_model)
    if ckpt["num_classes"] != len(labels):
        raise CheckpointError(f"--init_model {cfg.init_model} has {ckpt['num_classes']} classes but the label "
                              f"list has {len(labels)}")
    loader = eval_loader(test_ds, cfg.eval_batch, rt.rank, rt.world_size, cfg.num_workers)
    model = model_from_checkpoint(ckpt).eval()
    quant = ckpt.get("quant")
    variants = []
    if ckpt["stage"] == "float":
        variants.append(("float", model))
        if cfg.int8:
            log("--int8 ignored: the checkpoint is a float model (train it with QAT first)")
    else:
        if ckpt["stage"] == "qat":
            make_transpiler(quant).freeze_program(model)
        if ckpt["stage"] in ("qat", "frozen"):
            variants.append(("frozen", model))
        if cfg.int8 or ckpt["stage"] == "int8":
            int8_model = model
            if ckpt["stage"] != "int8":
                int8_model = copy.deepcopy(model)   # convert_to_int8 works in place; keep the frozen one
                make_transpiler(quant).convert_to_int8(int8_model)
            variants.append(("int8", int8_model))
    results = {}
    save_dir = Path(cfg.model_save_dir) if cfg.model_save_dir else None
    for stage, net in variants:
        net.to(rt.device)
        net.to(memory_format=preferred_layout(net, rt.device))
        r = evaluate(net, loader, len(labels), rt.device, rt, cfg.ap_version, rt.is_main and not cfg.quiet,
                     f"test {stage}")
        results[stage] = {"map": r["map"], "ms_per_image": r["ms_per_image"], "metric": r["metric"]}
        line = f"{stage:>6}: mAP {r['map']:.4f}  {r['ms_per_image']:.1f} ms/image (median over batches)"
        if save_dir is not None and rt.is_main:
            path = save_dir / f"{stage}.pt"
            atomic_save(model_record(net, stage, quant, labels), path)
            results[stage].update(path=str(path), size_mb=path.stat().st_size / 2**20)
            line += f"  {results[stage]['size_mb']:.2f} MB ({path})"
        log(line)
    return results
