"""Data pipeline: VOC reader (real sample), its checks, batching across processes, the synthetic generator."""
import shutil

import numpy as np
import pytest
import torch

from conftest import SHARED_DIR
from ssd.data import (
    DatasetError, EvalBatches, EvalTransform, TrainBatches, TrainTransform, VOCDataset, default_image_sets,
    default_label_list, eval_loader, read_label_list, set_loader_epoch, train_loader,
)
from ssd.data import synthetic

VOC_SAMPLE = SHARED_DIR / "data" / "voc2012_sample"
needs_sample = pytest.mark.skipif(not VOC_SAMPLE.is_dir(), reason="../shared/data/voc2012_sample absent")


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("synth"), seed=3, train=12, test=4)


@pytest.fixture
def broken(tmp_path, synth_dir):
    shutil.copytree(synth_dir, tmp_path / "broken")
    return tmp_path / "broken"


def _xml(root, image_id):
    return root / "VOCdevkit" / "VOCsynthetic" / "Annotations" / f"{image_id}.xml"


# ------------------------------------------------------------------ VOC reader
@needs_sample
def test_voc_sample_counts():
    ds = VOCDataset(VOC_SAMPLE, ["2012_val"])
    assert len(ds) == 100 and ds.labels == default_label_list() and ds.labels[0] == "background"
    assert ds.problems == [] and ds.skipped == []
    anns = [ds.annotation(i) for i in range(len(ds))]
    assert sum(len(a.labels) for a in anns) == 273
    assert sum(int(a.difficult.sum()) for a in anns) == 38
    assert {int(label) for a in anns for label in a.labels} == set(range(1, 21))
    assert all(np.all(a.boxes[:, 2:] > a.boxes[:, :2]) for a in anns)


@needs_sample
def test_voc_sample_first_image_matches_xml():
    ds = VOCDataset(VOC_SAMPLE / "VOCdevkit", "2012_val")   # the devkit folder itself works too
    i = [item.image_id for item in ds.items].index("2007_000027")
    image, boxes, labels, difficult = ds[i]
    assert image.size == (486, 500) and image.mode == "RGB"
    # normalised by the image's own size, as the reference (no -1 for VOC's 1-based pixels)
    np.testing.assert_allclose(boxes[0], [174 / 486, 101 / 500, 349 / 486, 351 / 500], rtol=1e-6)
    assert ds.labels[labels[0]] == "person" and not difficult[0]


def test_reference_list_files_are_the_default_sets(synth_dir, tmp_path):
    """The reference's data folder: trainval.txt / test.txt of '<image> <annotation>' lines."""
    root = tmp_path / "pascalvoc"
    shutil.copytree(synth_dir / "VOCdevkit" / "VOCsynthetic", root / "VOCdevkit" / "VOC2007")
    ids = (root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    (root / "trainval.txt").write_text("".join(f"VOCdevkit/VOC2007/JPEGImages/{i}.jpg "
                                               f"VOCdevkit/VOC2007/Annotations/{i}.xml\n" for i in ids[:5]))
    (root / "test.txt").write_text(f"VOCdevkit/VOC2007/JPEGImages/{ids[5]}.jpg VOCdevkit/VOC2007/Annotations/{ids[5]}.xml\n")
    assert default_image_sets(root) == ("trainval.txt", "test.txt")
    ds = VOCDataset(root, "trainval.txt", ["background", *synthetic.CLASSES])
    assert [item.image_id for item in ds.items] == ids[:5]
    (root / "test.txt").write_text("only-one-column\n")
    with pytest.raises(DatasetError, match="test.txt line 1"):
        VOCDataset(root, "test.txt", ["background", *synthetic.CLASSES])


def test_label_list_file_overrides(tmp_path, synth_dir):
    assert read_label_list(synth_dir / "label_list")[0] == "background"
    ds = VOCDataset(synth_dir, "synthetic_trainval")          # picks data_dir/label_list up
    assert ds.labels == ["background", *synthetic.CLASSES]
    (tmp_path / "labels.txt").write_text("circle\nsquare\n")
    assert read_label_list(tmp_path / "labels.txt") == ["background", "circle", "square"]


def test_errors_name_the_file_before_any_sample_is_read(tmp_path, synth_dir, broken):
    with pytest.raises(DatasetError, match="does not exist"):
        VOCDataset(tmp_path / "nowhere", "2007_test")
    with pytest.raises(DatasetError, match="test.txt"):
        VOCDataset(synth_dir, "2007_test")
    with pytest.raises(DatasetError, match="<year>_<split>"):
        VOCDataset(synth_dir, "trainval")
    with pytest.raises(DatasetError, match="not in the label list"):
        VOCDataset(synth_dir, "synthetic_trainval", label_list=["background", "circle"])
    xml = _xml(broken, "trainval_00003")
    xml.write_text("<annotation><size>")
    with pytest.raises(DatasetError, match="cannot read annotation .*trainval_00003.xml"):
        VOCDataset(broken, "synthetic_trainval")
    xml.unlink()
    with pytest.raises(DatasetError, match="annotation .*trainval_00003.xml does not exist"):
        VOCDataset(broken, "synthetic_trainval")
    image = broken / "VOCdevkit" / "VOCsynthetic" / "JPEGImages" / "test_00001.jpg"
    image.unlink()
    with pytest.raises(DatasetError, match="image .*test_00001.jpg does not exist"):
        VOCDataset(broken, "synthetic_test")


def test_an_unreadable_image_is_named_when_loaded(broken):
    ds = VOCDataset(broken, "synthetic_test")
    ds.image_path(2).write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match="cannot read image .*test_00002.jpg"):
        ds[2]


def test_degenerate_boxes_are_dropped_with_a_message_and_counted(broken):
    before = VOCDataset(broken, "synthetic_trainval")
    index = next(i for i in range(len(before)) if len(before.annotation(i).labels) >= 2)
    image_id = before.items[index].image_id
    xml = _xml(broken, image_id)
    text = xml.read_text()
    xmin = text[text.index("<xmin>") + 6:text.index("</xmin>")]
    xml.write_text(text[:text.index("<xmax>")] + f"<xmax>{xmin}</xmax>" + text[text.index("</xmax>") + 7:])
    ds = VOCDataset(broken, "synthetic_trainval")
    assert ds.degenerate_boxes == 1 and len(ds) == len(before)
    (message,) = ds.problems
    assert f"{image_id}.xml, object 1" in message and "degenerate box" in message and "dropped" in message
    assert ds.report()[-1] == "1 degenerate box(es) dropped (listed above)"
    np.testing.assert_array_equal(ds.annotation(index).boxes, before.annotation(index).boxes[1:])


def test_an_image_without_boxes_is_skipped(broken):
    xml = _xml(broken, "trainval_00002")
    text = xml.read_text()
    xml.write_text(text[:text.index("<object>")] + "</annotation>\n")
    ds = VOCDataset(broken, "synthetic_trainval")
    assert len(ds) == 11 and ds.skipped == ["trainval_00002"]
    assert any("without any box skipped" in line for line in ds.report())


# ------------------------------------------------------------------ batching
def test_train_batches_split_every_batch_evenly_and_keep_the_remainder():
    single = TrainBatches(10, 4, seed=1)
    batches = list(single)
    assert [len(b) for b in batches] == [4, 4, 2] and sorted(sum(batches, [])) == list(range(10))
    # two processes: each takes half of every global batch; the short last one is completed from the start
    ranks = [list(TrainBatches(10, 4, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert [len(b) for b in ranks[0]] == [2, 2, 2] == [len(b) for b in ranks[1]]
    glued = [a + b for a, b in zip(*ranks)]
    assert glued[:2] == batches[:2] and glued[2][:2] == batches[2] and glued[2][2:] == batches[0][:2]
    # a single image left over would break batch norm: completed as well
    assert [len(b) for b in TrainBatches(9, 4, seed=1)] == [4, 4, 4]
    # the order is a function of (seed, epoch) only
    again = TrainBatches(10, 4, seed=1)
    again.set_epoch(3)
    single.set_epoch(3)
    assert list(again) == list(single) != batches
    with pytest.raises(ValueError, match="evenly"):
        TrainBatches(10, 5, world_size=2)


def test_eval_batches_share_whole_batches_between_processes():
    single = list(EvalBatches(11, 4))
    assert single == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    shares = [list(EvalBatches(11, 4, rank=r, world_size=2)) for r in range(2)]
    assert shares == [[single[0], single[2]], [single[1]]]
    assert [len(EvalBatches(11, 4, rank=r, world_size=2)) for r in range(2)] == [2, 1]
    assert list(EvalBatches(3, 4, rank=1, world_size=2)) == []


def test_loaders_are_seeded_and_carry_indices(synth_dir):
    ds = VOCDataset(synth_dir, "synthetic_trainval", transform=TrainTransform(), seed=1)
    loader = train_loader(ds, batch_size=4, seed=1, num_workers=2)
    set_loader_epoch(loader, 2)
    first = list(loader)
    serial = train_loader(ds, batch_size=4, seed=1, num_workers=0)
    set_loader_epoch(serial, 2)
    again = list(serial)
    batch = first[0]
    assert batch.images.shape[0] + batch.dropped == 4 and batch.images.shape[1:] == (3, 300, 300)
    assert len(batch.boxes) == len(batch.labels) == len(batch.difficult) == len(batch.indices) == batch.images.shape[0]
    for a, b in zip(first, again):
        assert a.indices == b.indices and torch.equal(a.images, b.images)
        assert all(torch.equal(x, y) for x, y in zip(a.boxes, b.boxes))
    set_loader_epoch(loader, 3)
    assert next(iter(loader)).indices != batch.indices
    test = VOCDataset(synth_dir, "synthetic_test", transform=EvalTransform())
    assert [b.indices for b in eval_loader(test, 3)] == [[0, 1, 2], [3]]


# ------------------------------------------------------------------ generator
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
