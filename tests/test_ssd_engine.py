"""ssd.engine / ssd.runtime pieces: evaluation split across processes gives the single-process mAP, the
median forward time, the quantizer buffers kept out of DDP's per-step broadcast, the allocator set-up."""
import pytest
import torch
from torch import nn

from ssd.data import EvalTransform, VOCDataset, eval_loader, synthetic
from ssd.engine import evaluate, median_ms_per_image
from ssd.priors import prior_boxes
from ssd.runtime import keep_freed_memory, quantizer_buffer_names


class ImageKeyedDetector(nn.Module):
    """Detections that depend on each image alone (scores seeded by its pixels), boxes at the priors."""

    num_classes = 6

    def forward(self, images):
        priors = prior_boxes().shape[0]
        confs = []
        for image in images:
            gen = torch.Generator().manual_seed(int(image.abs().sum().item() * 1000) % 2**31)
            confs.append(3 * torch.randn(priors, self.num_classes, generator=gen))
        return torch.zeros(images.shape[0], priors, 4), torch.stack(confs)


class OtherRank:
    """A process other than rank 0: keeps what it would send."""

    is_main = False

    def gather(self, obj):
        self.sent = obj
        return None

    def broadcast(self, obj):
        return (float("nan"), float("nan"))


class RankZero:
    """Rank 0 of a group whose other processes sent ``others``."""

    is_main = True

    def __init__(self, others):
        self.others = others

    def gather(self, obj):
        return [obj, *self.others]

    def broadcast(self, obj):
        return obj


@pytest.fixture(scope="module")
def test_set(tmp_path_factory):
    root = synthetic.generate(tmp_path_factory.mktemp("eval"), seed=11, train=0, test=7)
    return VOCDataset(root, "synthetic_test", transform=EvalTransform())


@pytest.mark.parametrize("world_size", [2, 3])
def test_evaluation_split_across_processes_gives_the_single_process_map(test_set, world_size):
    model = ImageKeyedDetector()
    single = evaluate(model, eval_loader(test_set, 2), 6, torch.device("cpu"))
    assert single["map"] > 0 and single["metric"] is not None
    others = []
    for rank in range(1, world_size):
        rt = OtherRank()
        out = evaluate(model, eval_loader(test_set, 2, rank, world_size), 6, torch.device("cpu"), rt)
        assert out["metric"] is None
        others.append(rt.sent)
    indices = sorted(r[0] for part in others for r in part[0])
    split = evaluate(model, eval_loader(test_set, 2, 0, world_size), 6, torch.device("cpu"), RankZero(others))
    assert split["map"] == single["map"]
    own = [i for batch in eval_loader(test_set, 2, 0, world_size) for i in batch.indices]
    assert sorted(indices + own) == list(range(len(test_set)))          # every image once
    for label, curve in single["metric"].pr_curves().items():
        torch.testing.assert_close(split["metric"].pr_curve(label).precision, curve.precision, rtol=0, atol=0)


def test_median_forward_time_leaves_out_each_process_warm_up():
    # per image: rank 0 (1000), 100, 200; rank 1 (9000), 300; a lone batch counts
    assert median_ms_per_image([[(1.0, 1), (0.2, 2), (0.4, 2)], [(9.0, 1), (0.3, 1)]]) == pytest.approx(200.0)
    assert median_ms_per_image([[(0.5, 2)]]) == pytest.approx(250.0)


def test_quantizer_buffers_are_named_for_ddp_to_ignore():
    from qkernels import QuantizeTranspiler
    from ssd.model import MobileNetSSD

    model = MobileNetSSD(num_classes=3)
    QuantizeTranspiler(activation_quantize_type="range_abs_max").training_transpile(model)
    names = quantizer_buffer_names(model)
    buffers = dict(model.named_buffers())
    # 47 convs; each feature map's readers (the next block and its two heads) share one input quantizer
    shared = {id(m.input_quantizer) for m in model.modules() if hasattr(m, "input_quantizer")}
    assert len(shared) == 47 - 5 * 2 - 1
    assert len(names) == len(shared) * 3 and all(n in buffers for n in names)
    assert {n.rsplit(".", 1)[1] for n in names} == {"scale", "window", "step"}
    assert not any("running" in n or "num_batches" in n for n in names)


def test_keep_freed_memory_sets_glibc_malloc():
    described = keep_freed_memory()
    assert "M_MMAP_THRESHOLD=1024 MiB" in described and "M_TRIM_THRESHOLD" in described
