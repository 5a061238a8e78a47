"""SSD data: PascalVOC reader, augmentation, batching, and a generated shapes dataset."""
from .loader import EpochSampler, detection_collate, make_loader, set_loader_epoch  # noqa: F401
from .transforms import IMAGE_SIZE, EvalTransform, TrainTransform, to_network_input  # noqa: F401
from .voc import (  # noqa: F401
    VOC_CLASSES, DatasetError, VOCDataset, default_label_list, read_label_list, resolve_label_list,
)
