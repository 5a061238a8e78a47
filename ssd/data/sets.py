"""The training and test data sets of a run: which image sets, which label list, which augmentation."""
from __future__ import annotations

from pathlib import Path

from .transforms import IMAGE_SIZE, MEAN_BGR, EvalTransform, LightTrainTransform, TrainTransform
from .voc import VOCDataset, find_devkit, resolve_label_list

# full: the reference's augmentation, boxes following the cropped pixels; reference: exactly the
# reference's (boxes mapped with the unrounded crop window); light: distortion, resize and flip only.
AUGMENTATIONS = ("full", "reference", "light")
REFERENCE_LISTS = ("trainval.txt", "test.txt")          # the reference's data folder (data/pascalvoc)
VOC_SETS = ("2007_trainval,2012_trainval", "2007_test")


def default_image_sets(data_dir: str | Path) -> tuple[str, str]:
    """The generated set's image sets; else the reference's list files when the folder has them; else
    VOC2007+2012 trainval for training and VOC2007 test."""
    from . import synthetic   # here, not at import: `python -m ssd.data.synthetic` runs that module as __main__

    data_dir = Path(data_dir)
    if (find_devkit(data_dir) / f"VOC{synthetic.YEAR}").is_dir():
        return synthetic.TRAIN_SET, synthetic.TEST_SET
    if all((data_dir / name).is_file() for name in REFERENCE_LISTS):
        return REFERENCE_LISTS
    return VOC_SETS


def train_transform(augment: str, size: int = IMAGE_SIZE, mean_bgr=MEAN_BGR):
    if augment == "full":
        return TrainTransform(size, mean_bgr)
    if augment == "reference":
        return TrainTransform(size, mean_bgr, reference_boxes=True)
    if augment == "light":
        return LightTrainTransform(size, mean_bgr)
    raise ValueError(f"unknown augmentation {augment!r}; expected one of {AUGMENTATIONS}")


def build_datasets(data_dir, train_sets: str | None, test_sets: str | None, label_list: str | None = None,
                   augment: str = "full", mean_bgr=MEAN_BGR, size: int = IMAGE_SIZE, seed: int = 0,
                   need_train: bool = True):
    """(labels, training set or None, test set). Unset image sets take ``default_image_sets``."""
    labels = resolve_label_list(data_dir, label_list)
    default_train, default_test = default_image_sets(data_dir)
    train = None
    if need_train:
        train = VOCDataset(data_dir, train_sets or default_train, labels, train_transform(augment, size, mean_bgr),
                           seed=seed)
    test = VOCDataset(data_dir, test_sets or default_test, labels, EvalTransform(size, mean_bgr), seed=seed)
    return labels, train, test
