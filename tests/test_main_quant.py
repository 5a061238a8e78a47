"""The command line end to end on a tiny generated set: train (float, QAT), resume, test (frozen, int8),
infer, a two-process gloo run, and clear errors."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssd import main_quant
from ssd.data import synthetic

REPO = Path(__file__).resolve().parents[1]
VOC_SAMPLE = REPO.parent / "shared" / "data" / "voc2012_sample" / "VOCdevkit" / "VOC2012"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("tiny"), seed=5, train=4, test=2)


def _flags(data_dir, save_dir, *extra):
    return ["--data_dir", str(data_dir), "--model_save_dir", str(save_dir), "--batch_size", "4",
            "--num_workers", "0", "--quiet", "--eval_batch_size", "2", "--learning_rate", "0.001",
            "--use_gpu", "false", *extra]


@pytest.fixture(scope="module")
def float_run(data_dir, tmp_path_factory):
    save = tmp_path_factory.mktemp("float")
    result = main_quant.run(_flags(data_dir, save, "--act_quant_type", "none", "--epoc_num", "1"))
    return save, result


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_float_train_writes_checkpoints_and_map(float_run):
    save, result = float_run
    assert (save / "last.pt").is_file() and (save / "best.pt").is_file()
    assert not [p for p in save.iterdir() if ".tmp" in p.name]
    (record,) = result["history"]
    assert record["epoch"] == 1 and 0.0 <= record["map"] <= 1.0 and record["loss"] > 0
    ckpt = torch.load(save / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["stage"] == "float" and ckpt["epoch"] == 1 and "optimizer" in ckpt and "rng" in ckpt


def test_float_test_mode(float_run, data_dir, tmp_path):
    save, _ = float_run
    out = main_quant.run(_flags(data_dir, tmp_path, "--mode", "test", "--init_model", str(save / "last.pt")))
    assert set(out) == {"float"} and 0.0 <= out["float"]["map"] <= 1.0 and out["float"]["size_mb"] > 10


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


def test_resume_gives_the_same_weights(static_runs):
    """Quantizer state (static scales, windows) is in the state dict, so it is compared too."""
    straight, resumed = static_runs
    a, b = _weights(straight["last"]), _weights(resumed["last"])
    assert a.keys() == b.keys() and any(k.endswith("scale") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ckpt = main_quant.read_checkpoint(resumed["last"])
    assert ckpt["epoch"] == 2 and [h["epoch"] for h in ckpt["history"]] == [1, 2]
    assert [h["lr"] for h in ckpt["history"]] == [0.001, 0.0005]


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


def test_dynamic_qat_train_and_test(float_run, data_dir, tmp_path):
    trained = main_quant.run(_flags(data_dir, tmp_path / "qat", "--init_model", str(float_run[0] / "last.pt"),
                                    "--act_quant_type", "abs_max", "--epoc_num", "1"))
    assert trained["stage"] == "qat" and trained["quant"]["act_quant_type"] == "abs_max"
    out = main_quant.run(_flags(data_dir, tmp_path, "--mode", "test", "--int8", "--init_model", trained["last"]))
    assert set(out) == {"frozen", "int8"} and abs(out["frozen"]["map"] - out["int8"]["map"]) < 0.2


@pytest.mark.skipif(not VOC_SAMPLE.is_dir(), reason="../shared/data/voc2012_sample absent")
def test_infer_on_a_real_voc_image(float_run, data_dir, tmp_path, capsys):
    from PIL import Image

    image = VOC_SAMPLE / "JPEGImages" / "2007_000027.jpg"
    out = main_quant.run(_flags(data_dir, tmp_path, "--mode", "infer", "--init_model",
                                str(float_run[0] / "last.pt"), "--image_path", str(image),
                                "--output_dir", str(tmp_path / "drawn"), "--confs_threshold", "0.0"))
    (entry,) = out.values()
    drawn = Image.open(entry["output"])
    assert drawn.size == Image.open(image).size
    assert "2007_000027" in capsys.readouterr().out
    assert (entry["detections"][:, 2:] <= torch.tensor([486, 500, 486, 500])).all()


def test_two_process_gloo_run(float_run, data_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ssd.main_quant", *_flags(data_dir, tmp_path, "--init_model", str(float_run[0] / "last.pt"),
                                           "--act_quant_type", "range_abs_max", "--epoc_num", "1")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ckpt = main_quant.read_checkpoint(tmp_path / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["stage"] == "qat"
    assert "2 process(es)" in proc.stdout


# ----------------------------------------------------------------------------- errors
def test_missing_data_dir_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main_quant.main(_flags(tmp_path / "nowhere", tmp_path))
    assert exc.value.code == 2 and "nowhere" in capsys.readouterr().err


def test_unknown_flag_value(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main_quant.run(_flags(tmp_path, tmp_path, "--act_quant_type", "fancy_max"))
    assert "fancy_max" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main_quant.run(_flags(tmp_path, tmp_path, "--lr_epochs", "30,60", "--lr_decay_rates", "1,0.1"))
    assert "--lr_decay_rates" in capsys.readouterr().err


def test_checkpoint_from_another_architecture(data_dir, tmp_path):
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 63, 1))
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(main_quant.CheckpointError, match="not a MobileNetSSD"):
        main_quant.run(_flags(data_dir, tmp_path, "--mode", "test", "--init_model", str(tmp_path / "other.pt")))
    record = {"format": main_quant.CHECKPOINT_FORMAT, "arch": "ResNet50-SSD", "stage": "float", "model": {}}
    torch.save(record, tmp_path / "resnet.pt")
    with pytest.raises(main_quant.CheckpointError, match="ResNet50-SSD"):
        main_quant.run(_flags(data_dir, tmp_path, "--mode", "test", "--init_model", str(tmp_path / "resnet.pt")))


def test_checkpoint_with_other_classes_or_missing_keys(float_run, data_dir, tmp_path):
    from ssd.model import MobileNetSSD

    torch.save(MobileNetSSD(num_classes=21).state_dict(), tmp_path / "voc21.pt")
    with pytest.raises(main_quant.CheckpointError, match="21 classes"):
        main_quant.run(_flags(data_dir, tmp_path, "--init_model", str(tmp_path / "voc21.pt"), "--epoc_num", "1",
                              "--act_quant_type", "none"))
    state = _weights(float_run[0] / "last.pt")
    del state["loc_heads.0.weight"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(main_quant.CheckpointError, match="loc_heads.0.weight"):
        main_quant.run(_flags(data_dir, tmp_path, "--mode", "test", "--init_model", str(tmp_path / "partial.pt")))


def test_learning_rate_schedule_is_piecewise_in_epochs():
    args = main_quant.parse_args(["--learning_rate", "0.01", "--lr_epochs", "2,4", "--lr_decay_rates", "1,0.1,0.01"])
    assert [round(main_quant.learning_rate(args, e), 6) for e in range(6)] == [0.01, 0.01, 0.001, 0.001, 1e-4, 1e-4]
