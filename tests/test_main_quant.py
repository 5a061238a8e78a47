"""The command line end to end on a tiny generated set and on real VOC images: train (float, QAT with its
epoch-0 test), resume, test (frozen, int8), infer, a two-process gloo run, the reference's flags, and
clear errors that leave nothing half-written."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DIR
from ssd import main_quant
from ssd.checkpoint import FORMAT, CheckpointError, read_checkpoint
from ssd.data import synthetic

REPO = Path(__file__).resolve().parents[1]
VOC_SAMPLE = SHARED_DIR / "data" / "voc2012_sample"
needs_sample = pytest.mark.skipif(not VOC_SAMPLE.is_dir(), reason="../shared/data/voc2012_sample absent")
# The transpiler traces MobileNet-SSD: a fallback to module order would be a regression.
pytestmark = pytest.mark.filterwarnings("error::qkernels.GraphTraceWarning")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("tiny"), seed=5, train=2, test=2)


def _flags(data_dir, save_dir, *extra):
    return ["--data_dir", str(data_dir), "--model_save_dir", str(save_dir), "--batch_size", "2",
            "--num_workers", "0", "--quiet", "--learning_rate", "0.001", "--use_gpu", "false", *extra]


@pytest.fixture(scope="module")
def float_run(data_dir, tmp_path_factory):
    save = tmp_path_factory.mktemp("float")
    result = main_quant.run(_flags(data_dir, save, "--act_quant_type", "none", "--epoc_num", "1"))
    return save, result


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_float_train_writes_checkpoints_that_load_with_weights_only(float_run):
    save, result = float_run
    assert (save / "last.pt").is_file() and (save / "best.pt").is_file()
    assert not [p for p in save.iterdir() if ".tmp" in p.name]
    (record,) = result["history"]            # no epoch-0 test for a float run
    assert record["epoch"] == 1 and 0.0 <= record["map"] <= 1.0 and record["loss"] > 0
    ckpt = torch.load(save / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["stage"] == "float" and ckpt["epoch"] == 1 and "optimizer" in ckpt and "rng" in ckpt
    assert ckpt["config"]["batch_size"] == 2 and ckpt["config"]["eval_batch_size"] is None
    # the optimizer has the reference's two learning-rate groups
    assert sorted(g["lr_multiplier"] for g in ckpt["optimizer"]["param_groups"]) == [0.1, 1.0]


def test_float_test_mode(float_run, data_dir, tmp_path):
    save, _ = float_run
    out = main_quant.run(_flags(data_dir, tmp_path, "--mode", "test", "--init_model", str(save / "last.pt")))
    assert set(out) == {"float"} and 0.0 <= out["float"]["map"] <= 1.0 and out["float"]["size_mb"] > 10
    # the test reader uses --batch_size (the last epoch's mAP of training was computed the same way)
    assert out["float"]["map"] == float_run[1]["history"][-1]["map"]


@pytest.fixture(scope="module")
def static_runs(float_run, data_dir, tmp_path_factory):
    """QAT range_abs_max from the float model: 2 epochs straight, and 1 epoch then --resume for the 2nd."""
    root = tmp_path_factory.mktemp("static")
    common = ["--init_model", str(float_run[0] / "last.pt"), "--act_quant_type", "range_abs_max",
              "--lr_epochs", "1", "--lr_decay_rates", "1,0.5"]
    straight = main_quant.run(_flags(data_dir, root / "straight", *common, "--epoc_num", "2"))
    main_quant.run(_flags(data_dir, root / "split", *common, "--epoc_num", "1"))
    resumed = main_quant.run(_flags(data_dir, root / "split", *common, "--epoc_num", "2", "--resume"))
    return straight, resumed


def test_qat_tests_the_transpiled_model_first_and_resume_gives_the_same_weights(static_runs):
    """Quantizer state (static scales, windows) is in the state dict, so it is compared too."""
    straight, resumed = static_runs
    assert [h["epoch"] for h in straight["history"]] == [0, 1, 2] and "loss" not in straight["history"][0]
    a, b = _weights(straight["last"]), _weights(resumed["last"])
    assert a.keys() == b.keys() and any(k.endswith("window") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ckpt = read_checkpoint(resumed["last"])
    assert ckpt["epoch"] == 2 and [h["epoch"] for h in ckpt["history"]] == [0, 1, 2]
    assert [h["lr"] for h in ckpt["history"][1:]] == [0.001, 0.0005]


def test_static_qat_test_int8_and_infer(static_runs, data_dir, tmp_path):
    out = main_quant.run(_flags(data_dir, tmp_path / "export", "--mode", "test", "--int8",
                                "--init_model", static_runs[0]["last"]))
    assert set(out) == {"frozen", "int8"}
    for stage in ("frozen", "int8"):
        assert 0.0 <= out[stage]["map"] <= 1.0 and out[stage]["ms_per_image"] > 0
    # the int8 model stores int8 weights: about a quarter of the frozen (float) file
    assert out["int8"]["size_mb"] < 0.4 * out["frozen"]["size_mb"]
    image = next((Path(data_dir) / "VOCdevkit" / "VOCsynthetic" / "JPEGImages").glob("test_*.jpg"))
    shown = main_quant.run(_flags(data_dir, tmp_path, "--mode", "infer", "--init_model", out["int8"]["path"],
                                  "--image_path", str(image.parent), "--output_dir", str(tmp_path / "drawn"),
                                  "--confs_threshold", "0.0"))
    assert len(shown) == len(list(image.parent.glob("*.jpg")))
    for entry in shown.values():
        assert Path(entry["output"]).is_file() and entry["detections"].shape[1] == 6
    assert not [p for p in (tmp_path / "drawn").iterdir() if ".tmp" in p.name]


def test_dynamic_qat_train_and_test(float_run, data_dir, tmp_path):
    trained = main_quant.run(_flags(data_dir, tmp_path / "qat", "--init_model", str(float_run[0] / "last.pt"),
                                    "--act_quant_type", "abs_max", "--epoc_num", "1"))
    assert trained["stage"] == "qat" and trained["quant"]["act_quant_type"] == "abs_max"
    # epoch 0: the transpiled float weights; abs_max quantizes per batch, so its mAP is near the float one
    assert abs(trained["history"][0]["map"] - float_run[1]["history"][-1]["map"]) < 0.2
    out = main_quant.run(_flags(data_dir, tmp_path, "--mode", "test", "--int8", "--init_model", trained["last"]))
    assert set(out) == {"frozen", "int8"} and abs(out["frozen"]["map"] - out["int8"]["map"]) < 0.2


def test_two_process_gloo_run(float_run, data_dir, tmp_path):
    """Two processes train a range_abs_max epoch, each taking half of the batch (the two images, completed
    to --batch_size 4) and one of the two test batches (tests/test_ssd_engine.py checks that a split
    evaluation gives the single-process mAP)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ssd.main_quant", *_flags(data_dir, tmp_path, "--init_model", str(float_run[0] / "last.pt"),
                                           "--act_quant_type", "range_abs_max", "--epoc_num", "1",
                                           "--lr_epochs", "1", "--lr_decay_rates", "1,0.5",
                                           "--batch_size", "4", "--eval_batch_size", "1")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ckpt = read_checkpoint(tmp_path / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["stage"] == "qat" and "2 process(es)" in proc.stdout
    assert [h["epoch"] for h in ckpt["history"]] == [0, 1] and 0.0 <= ckpt["history"][1]["map"] <= 1.0
    windows = [v for k, v in ckpt["model"].items() if k.endswith("input_quantizer.window")]
    assert len(windows) == 47 and all(int((w > 0).sum()) == 1 for w in windows)   # the epoch's one step


# ----------------------------------------------------------------------------- real VOC images
@needs_sample
def test_train_test_and_infer_on_real_voc_images(tmp_path, capsys):
    """A few VOC2012 images: train one float epoch with the full augmentation, test, draw."""
    ids = (VOC_SAMPLE / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main" / "val.txt").read_text().split()
    for name, chosen in (("train.txt", ids[:2]), ("test.txt", ids[2:4])):
        (tmp_path / name).write_text("".join(f"VOCdevkit/VOC2012/JPEGImages/{i}.jpg "
                                             f"VOCdevkit/VOC2012/Annotations/{i}.xml\n" for i in chosen))
    sets = ["--train_sets", str(tmp_path / "train.txt"), "--test_sets", str(tmp_path / "test.txt")]
    trained = main_quant.run(_flags(VOC_SAMPLE, tmp_path / "model", *sets, "--act_quant_type", "none",
                                    "--epoc_num", "1"))
    assert trained["history"][0]["images_per_s"] > 0 and trained["degenerate_boxes"] == 0
    tested = main_quant.run(_flags(VOC_SAMPLE, tmp_path / "export", *sets, "--mode", "test",
                                   "--init_model", trained["last"]))
    assert tested["float"]["map"] == trained["history"][0]["map"]
    image = VOC_SAMPLE / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000027.jpg"
    out = main_quant.run(_flags(VOC_SAMPLE, tmp_path, "--mode", "infer", "--init_model", trained["last"],
                                "--image_path", str(image), "--output_dir", str(tmp_path / "drawn"),
                                "--confs_threshold", "0.0"))
    from PIL import Image

    (entry,) = out.values()
    assert Image.open(entry["output"]).size == Image.open(image).size
    assert "2007_000027" in capsys.readouterr().out
    assert (entry["detections"][:, 2:] <= torch.tensor([486, 500, 486, 500])).all()


# ----------------------------------------------------------------------------- flags
def test_reference_flags_and_defaults(monkeypatch):
    cfg = main_quant.parse_config([])
    assert cfg.data_dir == "data/pascalvoc" and cfg.mean_BGR == [127.5, 127.5, 127.5]
    assert cfg.image_shape == [3, 300, 300] and cfg.parallel is True and cfg.eval_batch == cfg.batch_size == 64
    cfg = main_quant.parse_config(["--mean_BGR", "104,117,123", "--batch_size", "8", "--parallel", "false"])
    assert cfg.mean_BGR == [104.0, 117.0, 123.0] and cfg.eval_batch == 8 and cfg.parallel is False
    assert main_quant.parse_config(["--eval_batch_size", "3"]).eval_batch == 3
    from ssd.config import UsageError
    from ssd.runtime import Runtime

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="--parallel false"):
        Runtime(use_gpu=False, parallel=False)


@pytest.mark.parametrize("flags, message", [
    (["--act_quant_type", "fancy_max"], "fancy_max"),
    (["--lr_epochs", "30,60", "--lr_decay_rates", "1,0.1"], "--lr_decay_rates"),
    (["--image_shape", "3,512,512"], "--image_shape 3,512,512"),
    (["--mean_BGR", "1,2"], "--mean_BGR"),
])
def test_bad_flag_values_are_named(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        main_quant.run(_flags(tmp_path, tmp_path, *flags))
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- errors
def _main_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main_quant.main(argv)
    captured = capsys.readouterr()
    assert exc.value.code == 2 and "Traceback" not in captured.err
    return captured.err


def test_missing_data_dir_is_named(tmp_path, capsys):
    assert "nowhere" in _main_error(_flags(tmp_path / "nowhere", tmp_path), capsys)


def test_missing_image_or_bad_xml_stops_before_training(data_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    root = broken / "VOCdevkit" / "VOCsynthetic"
    (root / "JPEGImages" / "trainval_00001.jpg").unlink()
    save = tmp_path / "save"
    err = _main_error(_flags(broken, save, "--act_quant_type", "none"), capsys)
    assert "trainval_00001.jpg does not exist" in err and not save.exists()
    shutil.copy(data_dir / "VOCdevkit" / "VOCsynthetic" / "JPEGImages" / "trainval_00001.jpg", root / "JPEGImages")
    (root / "Annotations" / "test_00001.xml").write_text("<annotation><object>")
    err = _main_error(_flags(broken, save, "--act_quant_type", "none"), capsys)
    assert "cannot read annotation" in err and "test_00001.xml" in err and not save.exists()


def test_an_unreadable_image_in_a_loader_worker_is_one_error_line(data_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    (broken / "VOCdevkit" / "VOCsynthetic" / "JPEGImages" / "trainval_00001.jpg").write_bytes(b"garbage")
    flags = _flags(broken, tmp_path / "save", "--act_quant_type", "none")
    flags[flags.index("--num_workers") + 1] = "1"
    err = _main_error(flags, capsys)
    assert err.startswith("error: cannot read image") and "trainval_00001.jpg" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "save" / "last.pt").exists()


def test_checkpoint_from_another_architecture_or_with_code(data_dir, tmp_path):
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 63, 1))
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a MobileNetSSD"):
        main_quant.run(_flags(data_dir, tmp_path, "--mode", "test", "--init_model", str(tmp_path / "other.pt")))
    record = {"format": FORMAT, "arch": "ResNet50-SSD", "stage": "float", "model": {}}
    torch.save(record, tmp_path / "resnet.pt")
    with pytest.raises(CheckpointError, match="ResNet50-SSD"):
        main_quant.run(_flags(data_dir, tmp_path, "--mode", "test", "--init_model", str(tmp_path / "resnet.pt")))
    torch.save({"model": other}, tmp_path / "pickled_module.pt")     # a whole module: code, refused
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        main_quant.run(_flags(data_dir, tmp_path, "--init_model", str(tmp_path / "pickled_module.pt")))


def test_checkpoint_with_other_classes_or_missing_keys(float_run, data_dir, tmp_path):
    from ssd.model import MobileNetSSD

    torch.save(MobileNetSSD(num_classes=21).state_dict(), tmp_path / "voc21.pt")
    with pytest.raises(CheckpointError, match="21 classes"):
        main_quant.run(_flags(data_dir, tmp_path, "--init_model", str(tmp_path / "voc21.pt"), "--epoc_num", "1",
                              "--act_quant_type", "none"))
    state = _weights(float_run[0] / "last.pt")
    del state["loc_heads.0.weight"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="loc_heads.0.weight"):
        main_quant.run(_flags(data_dir, tmp_path, "--mode", "test", "--init_model", str(tmp_path / "partial.pt")))
