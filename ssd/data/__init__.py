"""SSD data: PascalVOC reader, the reference's augmentation, batching, and a generated shapes data set."""
from .loader import Batch, Collate, EvalBatches, TrainBatches, eval_loader, set_loader_epoch, train_loader  # noqa: F401
from .sets import AUGMENTATIONS, build_datasets, default_image_sets  # noqa: F401
from .transforms import IMAGE_SIZE, MEAN_BGR, EvalTransform, TrainTransform, to_network_input  # noqa: F401
from .voc import (  # noqa: F401
    VOC_CLASSES, DatasetError, VOCDataset, default_label_list, load_rgb, read_label_list, resolve_label_list,
)
