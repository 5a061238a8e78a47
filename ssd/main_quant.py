"""MobileNet-SSD with quantization-aware training: ``python -m ssd.main_quant --mode train|test|infer``.

train  build (or load --init_model), transpile for QAT unless --act_quant_type none, train with RMSProp and a
       piecewise learning rate, evaluate mAP after every epoch, write ``last.pt`` and ``best.pt`` atomically
       to --model_save_dir; --resume continues from ``last.pt`` exactly (data order and augmentation are
       functions of the seed and the epoch). Under torchrun every process trains a shard
       (DistributedDataParallel, NCCL on GPU, gloo on CPU); rank 0 evaluates and writes.
test   load a checkpoint, freeze it (QAT) and report mAP and ms/image; --int8 also runs the real int8 model;
       with --model_save_dir the inference models are written there (``float.pt``/``frozen.pt``/``int8.pt``).
infer  run a model (training checkpoint or saved inference model) on --image_path (a file or a folder) and
       write copies with the detections above --confs_threshold drawn into --output_dir.

Flags follow the reference's main_quant.py; the defaults are the reference's QAT recipe.
``run(argv)`` does the work and returns the results (the demo uses it); ``main()`` adds error reporting.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ARCH = "MobileNetSSD-v1-300"
CHECKPOINT_FORMAT = "qkernels-ssd/1"
ACT_QUANT_TYPES = ("none", "abs_max", "range_abs_max", "moving_average_abs_max")
WEIGHT_QUANT_TYPES = ("abs_max", "channel_wise_abs_max")
STAGES = ("float", "qat", "frozen", "int8")
L2_DECAY = 5e-5
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or does not fit the model being built."""


class UsageError(ValueError):
    """A flag combination or value that cannot work; the message says which flag."""


# ----------------------------------------------------------------------------- arguments
def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ssd.main_quant", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=("train", "test", "infer"), default="train")
    p.add_argument("--data_dir", default="data/synthetic", help="folder holding VOCdevkit (and label_list)")
    p.add_argument("--train_sets", default=None,
                   help="comma-separated <year>_<split> image sets; default: synthetic_trainval for the "
                        "generated set, else 2007_trainval,2012_trainval")
    p.add_argument("--test_sets", default=None, help="default: synthetic_test or 2007_test")
    p.add_argument("--label_list", default=None,
                   help="file of class names (background first); default <data_dir>/label_list or VOC's 20")
    p.add_argument("--init_model", default=None, help="float or QAT checkpoint to start from / to test / infer")
    p.add_argument("--act_quant_type", choices=ACT_QUANT_TYPES, default="abs_max",
                   help="activation quantizer; none trains the plain float32 model")
    p.add_argument("--weight_quant_type", choices=WEIGHT_QUANT_TYPES, default="abs_max")
    p.add_argument("--fold_bn", type=_bool, default=False, help="fold batch norm into the quantized convs")
    p.add_argument("--epoc_num", type=int, default=20, help="epochs to train (in total, counting resumed ones)")
    p.add_argument("--learning_rate", type=float, default=0.0001)
    p.add_argument("--lr_epochs", type=_int_list, default=[30, 60], help="epochs where the lr changes")
    p.add_argument("--lr_decay_rates", type=_float_list, default=[1.0, 0.1, 0.01],
                   help="lr multipliers, one more than --lr_epochs")
    p.add_argument("--batch_size", type=int, default=64, help="images per step (all processes together)")
    p.add_argument("--num_workers", type=int, default=2, help="data loader worker processes per process")
    p.add_argument("--augment", choices=("full", "light"), default="full",
                   help="full: the reference augmentation; light: photometric distortion and flip only")
    p.add_argument("--model_save_dir", default="quant_model")
    p.add_argument("--resume", type=_bool, nargs="?", const=True, default=False,
                   help="continue the run in --model_save_dir from its last.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--use_gpu", type=_bool, default=None, help="default: a GPU when one is available")
    p.add_argument("--int8", type=_bool, nargs="?", const=True, default=False,
                   help="test: also convert to real int8 and report its mAP and speed")
    p.add_argument("--ap_version", choices=("11point", "integral", "all_point"), default="11point")
    p.add_argument("--image_size", type=int, default=300, help="input side (the priors are defined for 300)")
    p.add_argument("--confs_threshold", type=float, default=0.5, help="infer: minimum score drawn")
    p.add_argument("--image_path", default="", help="infer: an image file or a folder of images")
    p.add_argument("--output_dir", default="infer_output", help="infer: where the drawn images go")
    p.add_argument("--eval_batch_size", type=int, default=8)
    p.add_argument("--quiet", type=_bool, nargs="?", const=True, default=False, help="no progress bars")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    problems = []
    if len(args.lr_decay_rates) != len(args.lr_epochs) + 1:
        problems.append(f"--lr_decay_rates needs {len(args.lr_epochs) + 1} values for --lr_epochs "
                        f"{args.lr_epochs}, got {args.lr_decay_rates}")
    if sorted(args.lr_epochs) != args.lr_epochs:
        problems.append(f"--lr_epochs must increase, got {args.lr_epochs}")
    if args.image_size != 300:
        problems.append(f"--image_size {args.image_size}: the priors and feature maps are defined for 300")
    for flag in ("epoc_num", "batch_size", "eval_batch_size"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.num_workers < 0:
        problems.append("--num_workers must be >= 0")
    if args.learning_rate <= 0:
        problems.append(f"--learning_rate must be > 0, got {args.learning_rate}")
    if args.mode == "infer" and not args.image_path:
        problems.append("--mode infer needs --image_path")
    if args.mode in ("test", "infer") and not args.init_model:
        problems.append(f"--mode {args.mode} needs --init_model (a checkpoint or a saved inference model)")
    if problems:
        parser.error("; ".join(problems))
    return args


# ----------------------------------------------------------------------------- process set-up
class Runtime:
    """Device and process group of this process."""

    def __init__(self, use_gpu: bool | None):
        gpu_available = torch.cuda.is_available()
        if use_gpu and not gpu_available:
            raise UsageError("--use_gpu true but no CUDA device is available")
        self.use_gpu = gpu_available if use_gpu is None else use_gpu
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.distributed = self.world_size > 1
        if self.use_gpu:
            self.device = torch.device("cuda", self.local_rank if self.distributed else torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            # share the cores between the processes of this machine
            local = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world_size)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
        if self.distributed and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if self.use_gpu else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def log(self, *parts) -> None:
        if self.is_main:
            print(*parts, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- models and checkpoints
def quant_config(args) -> dict | None:
    if args.act_quant_type == "none":
        return None
    return {"act_quant_type": args.act_quant_type, "weight_quant_type": args.weight_quant_type,
            "fold_bn": bool(args.fold_bn)}


def make_transpiler(quant: dict):
    from qkernels.transpiler import QuantizeTranspiler

    return QuantizeTranspiler(activation_quantize_type=quant["act_quant_type"],
                              weight_quantize_type=quant["weight_quant_type"], fold_bn=quant["fold_bn"])


def build_model(num_classes: int, quant: dict | None = None, stage: str = "float") -> torch.nn.Module:
    """The float model, then transpiled / frozen / converted up to ``stage`` (untrained weights)."""
    from ssd.model import MobileNetSSD

    if stage not in STAGES:
        raise ValueError(f"unknown model stage {stage!r}; expected one of {STAGES}")
    model = MobileNetSSD(num_classes=num_classes)
    if stage == "float":
        return model
    if quant is None:
        raise CheckpointError(f"a {stage} model needs its quantization settings")
    transpiler = make_transpiler(quant)
    transpiler.training_transpile(model)
    if stage in ("frozen", "int8"):
        model.eval()
        transpiler.freeze_program(model)
    if stage == "int8":
        transpiler.convert_to_int8(model)
    return model


def load_state_strict(model: torch.nn.Module, state: dict, source: str) -> None:
    """load_state_dict that names missing, unexpected and mis-shaped keys in its error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def names(items):
            return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {names(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {names(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} keys of another shape (checkpoint vs model): {names(shapes)}")
        raise CheckpointError(f"{source} does not fit the model ({type(model).__name__}, "
                              f"{ARCH}): " + "; ".join(parts))
    model.load_state_dict(state)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint or saved inference model as a dict; a bare state dict counts as a float model."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch.load raises many types for a corrupt file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if isinstance(data, dict) and data.get("format") == CHECKPOINT_FORMAT:
        if data.get("arch") != ARCH:
            raise CheckpointError(f"checkpoint {path} is for architecture {data.get('arch')!r}, "
                                  f"this command builds {ARCH!r}")
        data["path"] = str(path)
        return data
    if isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values()):
        num_classes = _classes_in_state(data, path)
        return {"format": CHECKPOINT_FORMAT, "arch": ARCH, "stage": "float", "quant": None, "model": data,
                "num_classes": num_classes, "labels": None, "path": str(path)}
    raise CheckpointError(f"{path} is neither a qkernels SSD checkpoint nor a state dict")


def _classes_in_state(state: dict, path) -> int:
    head = state.get("conf_heads.0.weight")
    if head is None:
        raise CheckpointError(f"state dict {path} has no 'conf_heads.0.weight': not a MobileNetSSD checkpoint "
                              f"(first keys: {', '.join(list(state)[:4])})")
    return int(head.shape[0]) // 3    # 3 priors per location on the first map


def model_from_checkpoint(ckpt: dict) -> torch.nn.Module:
    model = build_model(ckpt["num_classes"], ckpt.get("quant"), ckpt["stage"])
    load_state_strict(model, ckpt["model"], f"checkpoint {ckpt.get('path', '')}")
    return model


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file beside ``path`` then rename: a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def model_record(model, stage: str, quant: dict | None, labels: list[str]) -> dict:
    return {"format": CHECKPOINT_FORMAT, "arch": ARCH, "stage": stage, "quant": quant, "labels": list(labels),
            "num_classes": len(labels), "model": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}}


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


# ----------------------------------------------------------------------------- data
def default_sets(data_dir: str) -> tuple[str, str]:
    from ssd.data.synthetic import TEST_SET, TRAIN_SET, YEAR
    from ssd.data.voc import find_devkit

    if (find_devkit(data_dir) / f"VOC{YEAR}").is_dir():
        return TRAIN_SET, TEST_SET
    return "2007_trainval,2012_trainval", "2007_test"


def make_datasets(args, need_train: bool):
    from ssd.data import EvalTransform, TrainTransform, VOCDataset, resolve_label_list
    from ssd.data.transforms import IMAGE_SIZE

    labels = resolve_label_list(args.data_dir, args.label_list)  # raises naming a missing data dir
    train_sets, test_sets = default_sets(args.data_dir)
    train_sets, test_sets = args.train_sets or train_sets, args.test_sets or test_sets
    train_ds = None
    if need_train:
        tf = TrainTransform(IMAGE_SIZE)
        if args.augment == "light":
            tf = LightTrainTransform(IMAGE_SIZE)
        train_ds = VOCDataset(args.data_dir, train_sets, labels, tf, seed=args.seed)
    test_ds = VOCDataset(args.data_dir, test_sets, labels, EvalTransform(IMAGE_SIZE), seed=args.seed)
    return labels, train_ds, test_ds


class LightTrainTransform:
    """Photometric distortion and horizontal flip only (for short demo runs on small data)."""

    def __init__(self, size: int):
        from ssd.data.transforms import TrainTransform

        self.full = TrainTransform(size)

    def __call__(self, image, boxes, labels, difficult, rng):
        from ssd.data import transforms as T

        image = T.photometric_distort(image, rng)
        image, boxes = T.random_flip(image, boxes, rng)
        return T._as_tensors(T.resize(image, self.full.size), boxes, labels, difficult)


# ----------------------------------------------------------------------------- evaluation
def preferred_layout(model, device) -> torch.memory_format:
    """channels_last for a float model on CPU: oneDNN runs its convolutions (the depthwise ones above all)
    about 1.7x faster in training there. Quantized models keep their own layout handling."""
    from qkernels.nn import QuantConv2d

    quantized = any(isinstance(m, QuantConv2d) or type(m).__module__.startswith("qkernels")
                    for m in model.modules())
    if device.type == "cpu" and not quantized:
        return torch.channels_last
    return torch.contiguous_format


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model, loader, num_classes: int, device, ap_version: str = "11point", progress: bool = False,
             desc: str = "eval") -> dict:
    """mAP over the whole loader and the forward time per image (ms, model only, no NMS)."""
    from ssd.metrics import DetectionMAP
    from ssd.postprocess import detection_output
    from ssd.priors import prior_boxes

    was_training = model.training
    model.eval()
    priors = prior_boxes().to(device)
    metric = DetectionMAP(num_classes, overlap_threshold=0.5, evaluate_difficult=False, ap_version=ap_version)
    forward_s, images_seen = 0.0, 0
    batches = _progress(loader, progress, desc)
    layout = preferred_layout(model, device)
    for images, boxes, labels, difficult in batches:
        images = images.to(device).contiguous(memory_format=layout)
        _sync(device)
        start = time.perf_counter()
        locs, confs = model(images)
        _sync(device)
        forward_s += time.perf_counter() - start
        images_seen += images.shape[0]
        detections = [d.cpu() for d in detection_output(locs, confs, priors)]
        for d in detections:
            d[:, 2:] = d[:, 2:].clamp(0.0, 1.0)
        metric.update(detections, boxes, labels, difficult)
    model.train(was_training)
    return {"map": float(metric.accumulate()), "ms_per_image": 1000.0 * forward_s / max(images_seen, 1),
            "metric": metric}


def _progress(iterable, enabled: bool, desc: str, total=None):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, mininterval=1.0, dynamic_ncols=True)


# ----------------------------------------------------------------------------- training
def learning_rate(args, epoch: int) -> float:
    """Piecewise constant: the base lr times the rate of the last boundary reached (boundaries in epochs)."""
    passed = sum(1 for boundary in args.lr_epochs if epoch >= boundary)
    return args.learning_rate * args.lr_decay_rates[passed]


def make_optimizer(model, lr: float):
    # The reference's RMSProp (decay 0.95, epsilon 1e-6, no momentum) with L2 regularisation 5e-5.
    return torch.optim.RMSprop(model.parameters(), lr=lr, alpha=0.95, eps=1e-6, weight_decay=L2_DECAY)


def _initial_model(args, labels, rt: Runtime):
    quant = quant_config(args)
    model = build_model(len(labels), None, "float")
    if args.init_model:
        ckpt = read_checkpoint(args.init_model)
        if ckpt["num_classes"] != len(labels):
            raise CheckpointError(f"--init_model {args.init_model} has {ckpt['num_classes']} classes but the label "
                                  f"list has {len(labels)} ({', '.join(labels[:4])}, ...)")
        if ckpt["stage"] not in ("float", "qat"):
            raise CheckpointError(f"--init_model {args.init_model} is a {ckpt['stage']} inference model; "
                                  "training starts from a float or QAT checkpoint")
        if ckpt["stage"] == "qat":
            if quant != ckpt["quant"]:
                raise CheckpointError(f"--init_model {args.init_model} was trained with {ckpt['quant']}; "
                                      f"this run asks for {quant}: start from the float checkpoint instead")
            make_transpiler(quant).training_transpile(model)
        load_state_strict(model, ckpt["model"], f"--init_model {args.init_model}")
        rt.log(f"loaded {ckpt['stage']} weights from {args.init_model}")
        if ckpt["stage"] == "qat":
            return model, quant
    if quant is not None:
        make_transpiler(quant).training_transpile(model)
    return model, quant


def train(args, rt: Runtime) -> dict:
    from ssd.data import make_loader, set_loader_epoch
    from ssd.loss import MultiBoxLoss

    seed_everything(args.seed)
    labels, train_ds, test_ds = make_datasets(args, need_train=True)
    model, quant = _initial_model(args, labels, rt)
    model.to(rt.device).train()
    stage = "float" if quant is None else "qat"
    layout = preferred_layout(model, rt.device)
    model.to(memory_format=layout)
    optimizer = make_optimizer(model, learning_rate(args, 0))
    save_dir = Path(args.model_save_dir)
    start_epoch, history, best = 0, [], {"map": -1.0, "epoch": -1}
    if args.resume:
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
        rt.log(f"resuming {last} after epoch {start_epoch}")

    per_process = args.batch_size // rt.world_size
    if per_process < 2 or len(train_ds) < 2 * rt.world_size:
        # batch norm cannot train on one value per channel (the last feature map is 1x1)
        raise UsageError(f"--batch_size {args.batch_size} over {rt.world_size} process(es) with {len(train_ds)} "
                         "training images: every process needs batches of at least 2 images")
    # drop a short last batch (it could hold a single image); keep it when it is the only one
    drop_last = len(train_ds) >= args.batch_size
    train_loader = make_loader(train_ds, per_process, shuffle=True, num_workers=args.num_workers, seed=args.seed,
                               rank=rt.rank, world_size=rt.world_size, drop_last=drop_last)
    test_loader = make_loader(test_ds, args.eval_batch_size, shuffle=False, num_workers=args.num_workers)
    criterion = MultiBoxLoss(len(labels)).to(rt.device)
    net = model
    if rt.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.use_gpu else None)
    show = rt.is_main and not args.quiet
    rt.log(f"training {stage}{'' if quant is None else ' ' + str(quant)}: {len(train_ds)} images, "
           f"{args.epoc_num} epochs, batch {args.batch_size} on {rt.world_size} process(es), {rt.device}")

    for epoch in range(start_epoch, args.epoc_num):
        lr = learning_rate(args, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        set_loader_epoch(train_loader, epoch)
        net.train()
        losses, seen, start = [], 0, time.perf_counter()
        bar = _progress(train_loader, show, f"epoch {epoch + 1}/{args.epoc_num}", total=len(train_loader))
        for images, boxes, gt_labels, _difficult in bar:
            images = images.to(rt.device, non_blocking=True).contiguous(memory_format=layout)
            boxes = [b.to(rt.device) for b in boxes]
            gt_labels = [l.to(rt.device) for l in gt_labels]
            locs, confs = net(images)
            loss = criterion(locs, confs, boxes, gt_labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1}; "
                                         f"try a lower --learning_rate than {args.learning_rate}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            seen += images.shape[0] * rt.world_size
            if show:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", lr=f"{lr:.2g}",
                                img_s=f"{seen / (time.perf_counter() - start):.1f}")
        train_s = time.perf_counter() - start
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else math.nan, "lr": lr,
                  "images_per_s": seen / max(train_s, 1e-9)}
        if rt.is_main:
            result = evaluate(model, test_loader, len(labels), rt.device, args.ap_version, show,
                              f"eval epoch {epoch + 1}")
            record["map"] = result["map"]
            history.append(record)
            checkpoint = model_record(model, stage, quant, labels)
            checkpoint.update(optimizer=optimizer.state_dict(), epoch=epoch + 1, history=history, rng=rng_state(),
                              args=vars(args))
            if record["map"] > best["map"]:
                best = {"map": record["map"], "epoch": epoch + 1}
                checkpoint["best"] = best
                atomic_save(checkpoint, save_dir / "best.pt")
            checkpoint["best"] = best
            atomic_save(checkpoint, save_dir / "last.pt")
            rt.log(f"epoch {epoch + 1}/{args.epoc_num}: loss {record['loss']:.4f} lr {lr:.3g} "
                   f"{record['images_per_s']:.1f} img/s ({train_s:.0f} s), mAP {record['map']:.4f}")
        else:
            history.append(record)
        rt.barrier()
    return {"history": history, "best": best, "last": str(save_dir / "last.pt"),
            "best_path": str(save_dir / "best.pt"), "stage": stage, "quant": quant}


# ----------------------------------------------------------------------------- test
def file_size_mb(path: Path) -> float:
    return path.stat().st_size / 2**20


def test(args, rt: Runtime) -> dict:
    """Evaluate a checkpoint: the float model as is; a QAT model frozen (and, with --int8, as int8)."""
    from ssd.data import make_loader

    labels, _, test_ds = make_datasets(args, need_train=False)
    ckpt = read_checkpoint(args.init_model)
    if ckpt["num_classes"] != len(labels):
        raise CheckpointError(f"--init_model {args.init_model} has {ckpt['num_classes']} classes but the label "
                              f"list has {len(labels)}")
    loader = make_loader(test_ds, args.eval_batch_size, shuffle=False, num_workers=args.num_workers)
    model = model_from_checkpoint(ckpt).eval()
    quant = ckpt.get("quant")
    variants = []
    if ckpt["stage"] == "float":
        variants.append(("float", model))
    else:
        if ckpt["stage"] == "qat":
            make_transpiler(quant).freeze_program(model)
        if ckpt["stage"] in ("qat", "frozen"):
            variants.append(("frozen", model))
        if args.int8 or ckpt["stage"] == "int8":
            int8_model = model
            if ckpt["stage"] != "int8":
                int8_model = copy.deepcopy(model)   # convert_to_int8 works in place; keep the frozen one
                make_transpiler(quant).convert_to_int8(int8_model)
            variants.append(("int8", int8_model))
    if ckpt["stage"] == "float" and args.int8:
        rt.log("--int8 ignored: the checkpoint is a float model (train it with QAT first)")
    results = {}
    save_dir = Path(args.model_save_dir) if args.model_save_dir else None
    for stage, net in variants:
        net.to(rt.device)
        net.to(memory_format=preferred_layout(net, rt.device))
        r = evaluate(net, loader, len(labels), rt.device, args.ap_version, not args.quiet, f"test {stage}")
        results[stage] = {"map": r["map"], "ms_per_image": r["ms_per_image"], "metric": r["metric"]}
        if save_dir is not None:
            path = save_dir / f"{stage}.pt"
            atomic_save(model_record(net, stage, quant, labels), path)
            results[stage].update(path=str(path), size_mb=file_size_mb(path))
        rt.log(f"{stage:>6}: mAP {r['map']:.4f}  {r['ms_per_image']:.1f} ms/image"
               + (f"  {results[stage]['size_mb']:.2f} MB ({results[stage]['path']})" if save_dir else ""))
    return results


# ----------------------------------------------------------------------------- infer
def inference_model(path) -> tuple[torch.nn.Module, list[str]]:
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt).eval()
    if ckpt["stage"] == "qat":
        make_transpiler(ckpt["quant"]).freeze_program(model)
    labels = ckpt.get("labels")
    return model, labels


def _images_at(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise UsageError(f"--image_path {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        return files
    if not path.is_file():
        raise UsageError(f"--image_path {path} does not exist")
    return [path]


@torch.no_grad()
def detect(model, image_rgb: np.ndarray, device, score_threshold: float = 0.01) -> torch.Tensor:
    """Detections [K, 6] (label, score, xmin, ymin, xmax, ymax in pixels of the given image)."""
    from ssd.data.transforms import IMAGE_SIZE, resize, to_network_input
    from ssd.postprocess import detection_output
    from ssd.priors import prior_boxes

    x = to_network_input(resize(image_rgb, IMAGE_SIZE)).unsqueeze(0).to(device)
    locs, confs = model(x)
    det = detection_output(locs, confs, prior_boxes().to(device), score_threshold=score_threshold)[0].cpu()
    h, w = image_rgb.shape[:2]
    det[:, 2:] = det[:, 2:].clamp(0.0, 1.0) * torch.tensor([w, h, w, h], dtype=det.dtype)
    return det


def draw_detections(image_rgb: np.ndarray, detections: torch.Tensor, labels: list[str]):
    from PIL import Image, ImageDraw

    image = Image.fromarray(image_rgb)
    draw = ImageDraw.Draw(image)
    palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
               (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]
    width = max(2, round(min(image.size) / 150))
    for label, score, x0, y0, x1, y1 in detections.tolist():
        colour = palette[int(label) % len(palette)]
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        text = f"{labels[int(label)]} {score:.2f}"
        tx, ty = x0 + width, max(0.0, y0 - 12)
        box = draw.textbbox((tx, ty), text)
        draw.rectangle(box, fill=colour)
        draw.text((tx, ty), text, fill=(255, 255, 255))
    return image


def infer(args, rt: Runtime) -> dict:
    from ssd.data.voc import load_rgb, resolve_label_list

    model, labels = inference_model(args.init_model)
    if args.label_list or not labels:
        labels = resolve_label_list(args.data_dir if Path(args.data_dir).is_dir() else ".", args.label_list)
    if len(labels) != _num_classes(model):
        raise UsageError(f"the model has {_num_classes(model)} classes but the label list has {len(labels)}")
    model.to(rt.device)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for path in _images_at(Path(args.image_path)):
        image = load_rgb(path)
        det = detect(model, image, rt.device)
        det = det[det[:, 1] >= args.confs_threshold]
        target = out_dir / f"{path.stem}_detections.jpg"
        draw_detections(image, det, labels).save(target, quality=92)
        results[str(path)] = {"detections": det, "output": str(target)}
        rt.log(f"{path}: {len(det)} detection(s) -> {target}")
        for label, score, x0, y0, x1, y1 in det.tolist():
            rt.log(f"  {labels[int(label)]:<14} {score:.3f}  [{x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f}]")
    return results


def _num_classes(model) -> int:
    return int(getattr(_unwrap(model), "num_classes"))


# ----------------------------------------------------------------------------- entry points
def run(argv=None) -> dict:
    """Parse ``argv`` and run the mode; returns its results. Raises on errors (see ``main``)."""
    args = parse_args(argv)
    if args.mode != "infer" and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data_dir {args.data_dir} does not exist (generate the bundled set with "
                         f"`python -m ssd.synthetic --out {args.data_dir}` or point it at a VOCdevkit root)")
    rt = Runtime(args.use_gpu)
    try:
        if args.mode == "train":
            return train(args, rt)
        if args.mode == "test":
            return test(args, rt)
        return infer(args, rt)
    finally:
        rt.close()


def main(argv=None) -> None:
    from ssd.data.voc import DatasetError

    try:
        run(argv)
    except (UsageError, CheckpointError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
