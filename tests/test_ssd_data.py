"""Data pipeline: VOC reader (real sample), augmentation consistency, loader, synthetic generator."""
from pathlib import Path

import numpy as np
import pytest
import torch

from ssd.data import (
    DatasetError, EvalTransform, TrainTransform, VOCDataset, default_label_list, make_loader,
    read_label_list, set_loader_epoch,
)
from ssd.data import synthetic, transforms as T

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VOC_SAMPLE = SHARED / "data" / "voc2012_sample"
needs_sample = pytest.mark.skipif(not VOC_SAMPLE.is_dir(), reason="../shared/data/voc2012_sample absent")


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("synth"), seed=3, train=12, test=4)


# ------------------------------------------------------------------ VOC reader
@needs_sample
def test_voc_sample_counts():
    ds = VOCDataset(VOC_SAMPLE, ["2012_val"])
    assert len(ds) == 100 and ds.labels == default_label_list() and ds.labels[0] == "background"
    anns = [ds.annotation(i) for i in range(len(ds))]
    assert sum(len(a.labels) for a in anns) == 273
    assert sum(int(a.difficult.sum()) for a in anns) == 38
    assert {int(l) for a in anns for l in a.labels} == set(range(1, 21))
    for a in anns:
        assert np.all((a.boxes >= 0) & (a.boxes <= 1)) and np.all(a.boxes[:, 2:] > a.boxes[:, :2])


@needs_sample
def test_voc_sample_first_image_matches_xml():
    ds = VOCDataset(VOC_SAMPLE / "VOCdevkit", "2012_val")   # the devkit folder itself works too
    i = [image_id for _, image_id in ds.items].index("2007_000027")
    image, boxes, labels, difficult = ds[i]
    assert image.shape == (500, 486, 3) and image.dtype == np.uint8
    np.testing.assert_allclose(boxes[0], [174 / 486, 101 / 500, 349 / 486, 351 / 500], rtol=1e-6)
    assert ds.labels[labels[0]] == "person" and not difficult[0]


def test_label_list_file_overrides(tmp_path, synth_dir):
    assert read_label_list(synth_dir / "label_list")[0] == "background"
    ds = VOCDataset(synth_dir, "synthetic_trainval")          # picks data_dir/label_list up
    assert ds.labels == ["background", *synthetic.CLASSES]
    (tmp_path / "labels.txt").write_text("circle\nsquare\n")
    assert read_label_list(tmp_path / "labels.txt") == ["background", "circle", "square"]


def test_errors_name_the_file(tmp_path, synth_dir):
    with pytest.raises(DatasetError, match="does not exist"):
        VOCDataset(tmp_path / "nowhere", "2007_test")
    with pytest.raises(DatasetError, match="test.txt"):
        VOCDataset(synth_dir, "2007_test")
    with pytest.raises(DatasetError, match="<year>_<split>"):
        VOCDataset(synth_dir, "trainval")
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(synth_dir, broken)
    ds = VOCDataset(broken, "synthetic_trainval")
    xml = ds.items[0][0] / "Annotations" / f"{ds.items[0][1]}.xml"
    xml.write_text("<annotation><size>")
    with pytest.raises(DatasetError, match=str(xml.name)):
        ds[0]
    ds.image_path(1).unlink()
    with pytest.raises(DatasetError, match=ds.items[1][1] + ".jpg"):
        ds[1]
    with pytest.raises(DatasetError, match="not in the label list"):
        VOCDataset(broken, "synthetic_trainval", label_list=["background", "circle"]).annotation(_index_with_non_circle(ds))


def _index_with_non_circle(ds):
    for i in range(2, len(ds)):
        if any(ds.labels[l] != "circle" for l in ds.annotation(i).labels):
            return i
    raise AssertionError("synthetic set has only circles")


# ------------------------------------------------------------------ transforms
def _box_image(rng, colour=(255, 0, 255)):
    h, w = int(rng.integers(120, 260)), int(rng.integers(120, 260))
    image = np.full((h, w, 3), 90, dtype=np.uint8)
    x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
    x1, y1 = int(rng.integers(x0 + 40, w + 1)), int(rng.integers(y0 + 40, h + 1))
    image[y0:y1, x0:x1] = colour
    box = np.array([[x0 / w, y0 / h, x1 / w, y1 / h]], dtype=np.float32)
    return image, box


@pytest.mark.parametrize("seed", range(40))
def test_geometric_augmentation_keeps_boxes_on_their_pixels(seed):
    rng = np.random.default_rng(seed)
    image, box = _box_image(rng)
    out, boxes, labels, difficult = TrainTransform(size=300).geometric(
        image, box, np.array([1]), np.array([False]), np.random.default_rng(1000 + seed))
    assert out.shape == (300, 300, 3)
    assert boxes.shape == (1, 4) and labels.tolist() == [1] and difficult.tolist() == [False]
    assert np.all((boxes >= 0) & (boxes <= 1)) and np.all(boxes[:, 2:] > boxes[:, :2])
    magenta = (out[..., 0] > 200) & (out[..., 1] < 60) & (out[..., 2] > 200)
    x0, y0, x1, y1 = (boxes[0] * 300).tolist()
    inner = magenta[int(np.ceil(y0)) + 2:int(y1) - 2, int(np.ceil(x0)) + 2:int(x1) - 2]
    if inner.size:
        assert inner.all(), "box interior is not the box colour"
    outside = magenta.copy()
    outside[max(0, int(y0) - 2):int(np.ceil(y1)) + 2, max(0, int(x0) - 2):int(np.ceil(x1)) + 2] = False
    assert not outside.any(), "box colour outside the box"


def test_augmentation_is_deterministic_and_normalised():
    rng = np.random.default_rng(0)
    image, box = _box_image(rng)
    tf = TrainTransform()
    a = tf(image, box, np.array([3]), np.array([True]), np.random.default_rng(5))
    b = tf(image, box, np.array([3]), np.array([True]), np.random.default_rng(5))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    img = a[0]
    assert img.shape == (3, 300, 300) and img.dtype == torch.float32
    assert img.min() >= -127.5 * T.PIXEL_SCALE - 1e-6 and img.max() <= 127.5 * T.PIXEL_SCALE + 1e-6


def test_test_transform_is_bgr_normalised():
    image = np.zeros((10, 20, 3), dtype=np.uint8)
    image[..., 0] = 255          # red in RGB
    x, boxes, _, _ = EvalTransform(size=8)(image, np.zeros((0, 4), np.float32), np.zeros(0), np.zeros(0, bool))
    assert x.shape == (3, 8, 8) and boxes.shape == (0, 4)
    torch.testing.assert_close(x[2], torch.full((8, 8), 127.5 * 0.007843))   # red is the last channel
    torch.testing.assert_close(x[0], torch.full((8, 8), -127.5 * 0.007843))


def test_photometric_distortion_changes_colours_only():
    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    out = T.photometric_distort(image, np.random.default_rng(1), prob=1.0)
    assert out.shape == image.shape and out.dtype == np.uint8 and not np.array_equal(out, image)


def test_crop_samplers_match_reference():
    assert len(T.SSD_SAMPLERS) == 7 and T.SSD_SAMPLERS[0].min_scale == 1.0
    assert sorted(s.min_iou for s in T.SSD_SAMPLERS[1:]) == [0.0, 0.1, 0.3, 0.5, 0.7, 0.9]
    assert all(s.max_trials == 50 and s.min_scale == 0.3 and s.max_aspect == 2.0 for s in T.SSD_SAMPLERS[1:])


# ------------------------------------------------------------------ loader and generator
def test_loader_collates_variable_boxes_and_is_seeded(synth_dir):
    ds = VOCDataset(synth_dir, "synthetic_trainval", transform=TrainTransform(), seed=1)
    loader = make_loader(ds, batch_size=4, shuffle=True, num_workers=2, seed=1)
    set_loader_epoch(loader, 2)
    first = list(loader)
    serial = make_loader(ds, batch_size=4, shuffle=True, num_workers=0, seed=1)
    set_loader_epoch(serial, 2)
    again = list(serial)
    images, boxes, labels, difficult = first[0]
    assert images.shape == (4, 3, 300, 300) and len(boxes) == len(labels) == len(difficult) == 4
    assert all(b.shape[0] == l.shape[0] == d.shape[0] for b, l, d in zip(boxes, labels, difficult))
    for a, b in zip(first, again):
        assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    set_loader_epoch(loader, 3)
    assert not torch.equal(next(iter(loader))[0], first[0][0])


def test_sharded_sampler_covers_everything_once():
    from ssd.data import EpochSampler
    shards = [list(EpochSampler(10, True, seed=4, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5 and sorted(shards[0] + shards[1]) == list(range(10))


def test_synthetic_is_deterministic(tmp_path, synth_dir):
    again = synthetic.generate(tmp_path, seed=3, train=12, test=4)
    root_a, root_b = synth_dir / "VOCdevkit" / "VOCsynthetic", again / "VOCdevkit" / "VOCsynthetic"
    for rel in ("Annotations/trainval_00005.xml", "JPEGImages/test_00002.jpg", "ImageSets/Main/test.txt"):
        assert (root_a / rel).read_bytes() == (root_b / rel).read_bytes()
    ds = VOCDataset(synth_dir, "synthetic_trainval,synthetic_test")
    assert len(ds) == 16
    counts = [len(ds.annotation(i).labels) for i in range(len(ds))]
    assert min(counts) >= 1 and max(counts) <= 4


def test_synthetic_command_line(tmp_path):
    synthetic.main(["--out", str(tmp_path), "--seed", "1", "--train", "2", "--test", "1"])
    assert (tmp_path / "VOCdevkit" / "VOCsynthetic" / "ImageSets" / "Main" / "trainval.txt").read_text().split() \
        == ["trainval_00000", "trainval_00001"]
