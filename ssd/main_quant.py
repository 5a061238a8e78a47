"""MobileNet-SSD with quantization-aware training: ``python -m ssd.main_quant --mode train|test|infer``.

The command line only: it parses the flags (the reference's main_quant.py flags and defaults, plus a few
of ours), sets up the process (allocator, device, process group) and calls ssd.engine (train, test) or
ssd.infer. ``run(argv)`` does the work and returns the results (the demo uses it); ``main()`` adds error
reporting: a bad flag, data set or checkpoint ends with one ``error:`` line and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import engine, infer
from .checkpoint import CheckpointError
from .config import ACT_QUANT_TYPES, MALLOC_MODES, MODES, WEIGHT_QUANTIZE_TYPES, Config, UsageError
from .data import AUGMENTATIONS, DatasetError
from .metrics import AP_VERSIONS
from .runtime import Runtime, keep_freed_memory


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _list(kind):
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(prog="python -m ssd.main_quant", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    flag = p.add_argument
    flag("--mode", choices=MODES, default=d.mode)
    flag("--data_dir", default=d.data_dir, help="folder holding VOCdevkit (and label_list; the reference's "
         "trainval.txt / test.txt lists are used when present)")
    flag("--train_sets", default=d.train_sets, help="comma-separated image sets: <year>_<split> or list files "
         "(*.txt); default: the generated set's, else trainval.txt, else 2007_trainval,2012_trainval")
    flag("--test_sets", default=d.test_sets, help="as --train_sets; default synthetic_test, test.txt or 2007_test")
    flag("--label_list", default=d.label_list,
         help="file of class names (background first); default <data_dir>/label_list or VOC's 20")
    flag("--init_model", default=d.init_model, help="float or QAT checkpoint to start from / to test / infer")
    flag("--act_quant_type", choices=ACT_QUANT_TYPES, default=d.act_quant_type,
         help="activation quantizer; none trains the plain float32 model")
    flag("--weight_quant_type", choices=WEIGHT_QUANTIZE_TYPES, default=d.weight_quant_type)
    flag("--fold_bn", type=_bool, default=d.fold_bn, help="fold batch norm into the quantized convs")
    flag("--epoc_num", type=int, default=d.epoc_num, help="epochs to train (in total, counting resumed ones)")
    flag("--learning_rate", type=float, default=d.learning_rate,
         help="base rate (see --body_lr_multiplier)")
    flag("--body_lr_multiplier", type=float, default=d.body_lr_multiplier,
         help="learning-rate multiplier of the body's and extra blocks' conv weights (the reference's 0.1 "
              "suits fine-tuning a pretrained body; the demo trains from scratch with 1)")
    flag("--lr_epochs", type=_list(int), default=d.lr_epochs, help="epochs where the lr changes")
    flag("--lr_decay_rates", type=_list(float), default=d.lr_decay_rates,
         help="lr multipliers, one more than --lr_epochs")
    flag("--batch_size", type=int, default=d.batch_size, help="images per step (all processes together)")
    flag("--eval_batch_size", type=int, default=d.eval_batch_size,
         help="test batch; default --batch_size, as the reference (the abs_max model's mAP depends on it)")
    flag("--num_workers", type=int, default=d.num_workers, help="data loader worker processes per process")
    flag("--augment", choices=AUGMENTATIONS, default=d.augment,
         help="full: the reference's augmentation with boxes that follow the cropped pixels; reference: "
              "exactly the reference's; light: photometric distortion, resize and flip only")
    flag("--mean_BGR", type=_list(float), default=d.mean_BGR, help="mean of B, G, R subtracted from the input")
    flag("--image_shape", type=_list(int), default=d.image_shape, help="input shape C,H,W (3,300,300 only)")
    flag("--parallel", type=_bool, default=d.parallel,
         help="data-parallel over the processes torchrun starts (false: refuse to run as one of several)")
    flag("--model_save_dir", default=d.model_save_dir)
    flag("--resume", type=_bool, nargs="?", const=True, default=d.resume,
         help="continue the run in --model_save_dir from its last.pt")
    flag("--seed", type=int, default=d.seed)
    flag("--use_gpu", type=_bool, default=d.use_gpu, help="default: a GPU when one is available")
    flag("--int8", type=_bool, nargs="?", const=True, default=d.int8,
         help="test: also convert to real int8 and report its mAP and speed")
    flag("--ap_version", choices=AP_VERSIONS, default=d.ap_version)
    flag("--confs_threshold", type=float, default=d.confs_threshold, help="infer: minimum score drawn")
    flag("--image_path", default=d.image_path, help="infer: an image file or a folder of images")
    flag("--output_dir", default=d.output_dir, help="infer: where the drawn images go")
    flag("--quiet", type=_bool, nargs="?", const=True, default=d.quiet, help="no progress bars")
    flag("--malloc", choices=MALLOC_MODES, default=d.malloc,
         help="keep: glibc keeps freed memory for reuse (faster CPU training); system: leave malloc alone")
    return p


def parse_config(argv=None) -> Config:
    parser = build_parser()
    config = Config(**vars(parser.parse_args(argv)))
    problems = config.problems()
    if problems:
        parser.error("; ".join(problems))
    return config


def run(argv=None) -> dict:
    """Parse ``argv`` and run the mode; returns its results. Raises on errors (see ``main``)."""
    cfg = parse_config(argv)
    if cfg.mode != "infer" and not Path(cfg.data_dir).is_dir():
        raise UsageError(f"--data_dir {cfg.data_dir} does not exist (point it at a folder holding VOCdevkit, or "
                         f"generate the bundled set with `python -m ssd.data.synthetic --out {cfg.data_dir}`)")
    allocator = "system malloc"
    if cfg.malloc == "keep":
        try:
            allocator = keep_freed_memory()
        except OSError as exc:
            allocator = f"system malloc ({exc})"
    rt = Runtime(cfg.use_gpu, cfg.parallel)

    def log(line: str) -> None:
        if rt.is_main:
            print(line, flush=True)

    if cfg.mode == "train":
        log(f"allocator: {allocator}")
    try:
        if cfg.mode == "train":
            return engine.train(cfg, rt, log)
        if cfg.mode == "test":
            return engine.test(cfg, rt, log)
        return infer.infer(cfg, rt, log)
    finally:
        rt.close()


def _message(exc: BaseException) -> str:
    """The error's own message; for one re-raised from a data loader worker, without the worker's traceback."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def main(argv=None) -> None:
    try:
        run(argv)
    except (UsageError, CheckpointError, DatasetError, FloatingPointError) as exc:
        print(f"error: {_message(exc)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
