"""The settings of one ``ssd.main_quant`` run, their defaults (the reference's QAT recipe) and their checks."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from qkernels.nn.quantizers import ACTIVATION_QUANTIZE_TYPES, WEIGHT_QUANTIZE_TYPES

from .data.sets import AUGMENTATIONS
from .data.transforms import IMAGE_SIZE, MEAN_BGR
from .metrics import AP_VERSIONS
from .model import BODY_CONV_LR_MULTIPLIER

MODES = ("train", "test", "infer")
ACT_QUANT_TYPES = ("none", *ACTIVATION_QUANTIZE_TYPES)      # none: train the plain float32 model
MALLOC_MODES = ("keep", "system")


class UsageError(ValueError):
    """A flag combination or value that cannot work; the message says which flag."""


@dataclass
class Config:
    mode: str = "train"
    data_dir: str = "data/pascalvoc"          # the reference's default
    train_sets: str | None = None
    test_sets: str | None = None
    label_list: str | None = None
    init_model: str | None = None
    act_quant_type: str = "abs_max"
    weight_quant_type: str = "abs_max"
    fold_bn: bool = False
    epoc_num: int = 20
    learning_rate: float = 0.0001
    body_lr_multiplier: float = BODY_CONV_LR_MULTIPLIER   # the reference fine-tunes a pretrained body
    lr_epochs: list[int] = field(default_factory=lambda: [30, 60])
    lr_decay_rates: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.01])
    batch_size: int = 64
    eval_batch_size: int | None = None        # None: --batch_size, as the reference's test reader
    num_workers: int = 2
    augment: str = "full"
    mean_BGR: list[float] = field(default_factory=lambda: list(MEAN_BGR))
    image_shape: list[int] = field(default_factory=lambda: [3, IMAGE_SIZE, IMAGE_SIZE])
    parallel: bool = True
    model_save_dir: str = "quant_model"
    resume: bool = False
    seed: int = 0
    use_gpu: bool | None = None               # None: a GPU when one is available
    int8: bool = False
    ap_version: str = "11point"
    confs_threshold: float = 0.5
    image_path: str = ""
    output_dir: str = "infer_output"
    quiet: bool = False
    malloc: str = "keep"

    @property
    def eval_batch(self) -> int:
        return self.eval_batch_size or self.batch_size

    @property
    def image_size(self) -> int:
        return self.image_shape[1]

    def quant(self) -> dict | None:
        """The transpiler settings, None for a float run."""
        if self.act_quant_type == "none":
            return None
        return {"act_quant_type": self.act_quant_type, "weight_quant_type": self.weight_quant_type,
                "fold_bn": bool(self.fold_bn)}

    def as_dict(self) -> dict:
        return asdict(self)

    def problems(self) -> list[str]:
        """Every setting that cannot work, as a message naming its flag."""
        out = []
        for name, allowed in (("mode", MODES), ("act_quant_type", ACT_QUANT_TYPES),
                              ("weight_quant_type", WEIGHT_QUANTIZE_TYPES), ("augment", AUGMENTATIONS),
                              ("ap_version", AP_VERSIONS), ("malloc", MALLOC_MODES)):
            if getattr(self, name) not in allowed:
                out.append(f"--{name} {getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        if len(self.lr_decay_rates) != len(self.lr_epochs) + 1:
            out.append(f"--lr_decay_rates needs {len(self.lr_epochs) + 1} values for --lr_epochs "
                       f"{self.lr_epochs}, got {self.lr_decay_rates}")
        if sorted(self.lr_epochs) != list(self.lr_epochs):
            out.append(f"--lr_epochs must increase, got {self.lr_epochs}")
        if list(self.image_shape) != [3, IMAGE_SIZE, IMAGE_SIZE]:
            out.append(f"--image_shape {','.join(map(str, self.image_shape))}: the priors and feature maps are "
                       f"defined for 3,{IMAGE_SIZE},{IMAGE_SIZE}")
        if len(self.mean_BGR) != 3:
            out.append(f"--mean_BGR needs three values (B, G, R), got {self.mean_BGR}")
        for name in ("epoc_num", "batch_size"):
            if getattr(self, name) < 1:
                out.append(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            out.append(f"--eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if self.num_workers < 0:
            out.append("--num_workers must be >= 0")
        if self.body_lr_multiplier < 0:
            out.append(f"--body_lr_multiplier must be >= 0, got {self.body_lr_multiplier}")
        if self.learning_rate <= 0:
            out.append(f"--learning_rate must be > 0, got {self.learning_rate}")
        if self.mode == "infer" and not self.image_path:
            out.append("--mode infer needs --image_path")
        if self.mode in ("test", "infer") and not self.init_model:
            out.append(f"--mode {self.mode} needs --init_model (a checkpoint or a saved inference model)")
        return out

    def check(self) -> "Config":
        problems = self.problems()
        if problems:
            raise UsageError("; ".join(problems))
        return self
