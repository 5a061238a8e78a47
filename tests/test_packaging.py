"""Packaging as a PyTorch user meets it: the build report, the one-sentence error for an extension that
does not fit the running torch, and a wheel of this checkout that installs into a fresh venv sharing this
torch and runs from a folder outside the checkout (and, with QKERNELS_TEST_SDIST_BUILD=1, one built
CPU-only from the source distribution alone)."""
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import venv
import zipfile
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest
import torch

import qkernels
from qkernels import _library
from qkernels.__main__ import main as report_main
from qkernels.build_report import arch_runs_on

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(qkernels.__file__).resolve().parent
# Site-packages holding the torch (and numpy, pillow, ...) this test runs with.
TORCH_SITE = Path(torch.__file__).resolve().parents[1]


def _env(**extra):
    """Child processes: no PYTHONPATH (it would put this checkout on the path), pip offline and quiet."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QKERNELS_INT8_ISA")}
    env.update(PIP_NO_INDEX="1", PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _run(cmd, cwd, timeout=120, check=True, **env):
    proc = subprocess.run([str(c) for c in cmd], cwd=str(cwd), env=_env(**env), capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, "%s\n%s\n%s" % (cmd, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


# ----------------------------------------------------------------------------- the build report
def test_build_info_describes_this_build_and_machine(monkeypatch):
    monkeypatch.delenv("QKERNELS_INT8_ISA", raising=False)
    info = qkernels.build_info()
    record = json.loads((PACKAGE / "_build_info.json").read_text())
    assert info["qkernels_version"] == qkernels.__version__ == record["qkernels_version"]
    assert info["extension"] == _library._C.__file__
    assert (info["torch_built"], info["torch_built_cuda"]) == (record["torch_version"], record["torch_cuda_version"])
    assert (info["torch_running"], info["torch_running_cuda"]) == (torch.__version__, torch.version.cuda)
    assert info["torch_mismatch"] is None
    assert info["torch_headers"] == torch.__version__.split("+")[0]
    assert info["cuda_kernels"] is qkernels.has_cuda_kernels() is record["with_cuda"]
    if info["cuda_kernels"]:
        assert info["cuda_archs"] and all(re.fullmatch(r"(sm|compute)_\d+[af]?", a) for a in info["cuda_archs"])
        assert re.fullmatch(r"\d+\.\d+", info["cuda_toolkit"])
    else:
        assert info["cuda_archs"] == [] and info["cuda_toolkit"] is None
    if not torch.cuda.is_available():
        assert info["cuda_can_run"] is False and info["cuda_devices"] == []
    assert info["int8_isas"][0] == "portable" and info["int8_isa_best"] == info["int8_isas"][-1]
    assert info["int8_isa_selected"] == info["int8_isa_best"] and info["int8_isa_error"] is None
    assert json.loads(json.dumps(info)) == info  # plain values, ready for benchmark records


def test_build_info_follows_the_int8_isa_cap(monkeypatch):
    monkeypatch.setenv("QKERNELS_INT8_ISA", "portable")
    info = qkernels.build_info()
    assert (info["int8_isa_selected"], info["int8_isa_env"]) == ("portable", "portable")
    monkeypatch.setenv("QKERNELS_INT8_ISA", "sse9")
    info = qkernels.build_info()
    assert info["int8_isa_selected"] is None and "QKERNELS_INT8_ISA" in info["int8_isa_error"]
    assert "sse9" in qkernels.build_report.format_build_report(info)


def test_python_m_qkernels_prints_the_report(capsys, monkeypatch):
    monkeypatch.delenv("QKERNELS_INT8_ISA", raising=False)
    report_main([])
    text = capsys.readouterr().out
    info = qkernels.build_info()
    assert text.splitlines()[0].split() == ["qkernels", qkernels.__version__]
    assert "built against %s (" % info["torch_built"] in text and "running %s (" % torch.__version__ in text
    assert ("kernels compiled in" if info["cuda_kernels"] else "no kernels compiled in") in text
    assert "can run here: %s" % ("yes" if info["cuda_can_run"] else "no") in text
    assert "QKERNELS_INT8_ISA choices here: %s;" % ", ".join(info["int8_isas"]) in text
    report_main(["--json"])
    assert json.loads(capsys.readouterr().out) == info


@pytest.mark.parametrize("arch, capability, runs", [
    ("sm_90", (9, 0), True), ("sm_80", (8, 6), True), ("sm_86", (8, 0), False), ("sm_80", (9, 0), False),
    ("compute_80", (9, 0), True), ("compute_90", (8, 9), False), ("sm_90a", (9, 0), True),
    ("sm_90a", (10, 0), False), ("sm_100", (10, 3), True), ("sm_120", (10, 0), False),
    ("sm_100f", (10, 3), True), ("bogus", (9, 0), False),
])
def test_which_compiled_architectures_run_on_a_device(arch, capability, runs):
    assert arch_runs_on(arch, capability) is runs


# ----------------------------------------------------------------------------- a build for another torch
def _package_copy(root: Path, extension: str, record: dict = None) -> Path:
    """This qkernels package copied under root, with the extension `real`, `garbage` (an unloadable
    file) or `none`, and optionally another build record."""
    dst = root / "qkernels"
    shutil.copytree(PACKAGE, dst, ignore=shutil.ignore_patterns("__pycache__", "_C.*"))
    so_name = "_C" + EXTENSION_SUFFIXES[0]
    if extension == "real":
        shutil.copy2(PACKAGE / so_name, dst / so_name)
    elif extension == "garbage":
        (dst / so_name).write_text("not a shared library\n")
    if record is not None:
        (dst / "_build_info.json").write_text(json.dumps(record))
    return root


OLD_TORCH = {"torch_version": "1.13.1+cu117", "torch_cuda_version": "11.7", "with_cuda": True}


def test_an_extension_for_another_torch_fails_in_one_sentence(tmp_path):
    root = _package_copy(tmp_path, "garbage", OLD_TORCH)
    proc = _run([sys.executable, "-c", "import qkernels"], cwd=root, check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: qkernels: the compiled kernels in %s " % (root / "qkernels")), proc.stderr
    assert "were built against torch 1.13.1+cu117 (CUDA 11.7) but torch %s" % torch.__version__ in last
    assert "rebuild qkernels for the running torch" in last and "make install" in last
    # one exception, not the loader's traceback chained under ours
    assert proc.stderr.count("Traceback") == 1 and "direct cause" not in proc.stderr


def test_a_loaded_extension_for_another_torch_warns(tmp_path):
    root = _package_copy(tmp_path, "real", OLD_TORCH)
    code = "import qkernels; print(qkernels.build_info()['torch_mismatch'])"
    proc = _run([sys.executable, "-c", code], cwd=root)
    assert "RuntimeWarning: qkernels: the compiled kernels in %s were built against torch 1.13.1" % (
        root / "qkernels") in proc.stderr
    assert proc.stdout.strip().startswith("were built against torch 1.13.1+cu117 (CUDA 11.7) but torch")


def test_a_missing_extension_is_named(tmp_path):
    """Also where .venv holds an editable install (of this checkout): its import hook must not lend that
    build to a package folder without one."""
    root = _package_copy(tmp_path, "none")
    proc = _run([sys.executable, "-c", "import qkernels"], cwd=root, check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("ImportError: qkernels: the compiled kernels in"), proc.stderr
    assert "are not built (no qkernels/_C%s)" % EXTENSION_SUFFIXES[0] in last and "make install" in last


def test_an_extension_for_another_python_or_a_missing_library_is_named(tmp_path, monkeypatch):
    root = _package_copy(tmp_path, "none")
    monkeypatch.setattr(_library, "PACKAGE_DIR", str(root / "qkernels"))
    (root / "qkernels" / "_C.cpython-39-x86_64-linux-gnu.so").write_text("")
    message = _library.load_failure_message(ImportError("cannot import name '_C' from 'qkernels'"))
    assert "were built for another Python (found _C.cpython-39-x86_64-linux-gnu.so" in message
    # a record for this very torch: the loader's reason is passed on, with the rebuild hint
    (root / "qkernels" / ("_C" + EXTENSION_SUFFIXES[0])).write_text("")
    monkeypatch.setattr(_library, "read_build_record", lambda: {
        "torch_version": torch.__version__, "torch_cuda_version": torch.version.cuda})
    message = _library.load_failure_message(ImportError("libcudart.so.13: cannot open shared object file"))
    assert "did not load (libcudart.so.13: cannot open shared object file)" in message


# ----------------------------------------------------------------------------- imports in a checkout
def test_a_checkout_imports_its_own_build():
    """.venv may be shared by checkouts and hold another one's editable install: run from a checkout's
    root (as `make test` does), Python imports that checkout's own in-place build."""
    assert PACKAGE == REPO / "qkernels"
    proc = _run([sys.executable, "-c", "import qkernels, ssd; print(qkernels.__file__); print(ssd.__file__)"],
                cwd=REPO)
    assert proc.stdout.split() == [str(REPO / "qkernels" / "__init__.py"), str(REPO / "ssd" / "__init__.py")]


# ----------------------------------------------------------------------------- the wheel
WHEEL_CHECK = textwrap.dedent("""
    import json, torch, qkernels, ssd.main_quant
    from qkernels import reference
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 5, generator=g)
    out, scale = qkernels.fake_quant_abs_max(x, 8)
    want, want_scale = reference.fake_quant_abs_max(x, 8)
    xq = torch.randint(-128, 128, (7, 33), dtype=torch.int8, generator=g)
    wq = torch.randint(-128, 128, (5, 33), dtype=torch.int8, generator=g)
    acc = qkernels.linear_int8(xq, wq, out_dtype=torch.int32)
    print(json.dumps({
        "qkernels": qkernels.__file__, "ssd": ssd.main_quant.__file__, "version": qkernels.__version__,
        "fake_quant_max_err": (out.double() - want).abs().max().item(), "step": want_scale.item() / 127,
        "scale_equal": bool(scale == want_scale),
        "linear_exact": bool(torch.equal(acc.double(), xq.double() @ wq.double().t())),
        "cuda_kernels": qkernels.has_cuda_kernels()}))
""")


def _install_into_fresh_venv(wheel: Path, tmp: Path) -> dict:
    """A fresh venv with the wheel installed and this torch shared through a .pth file."""
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    # Installed before torch is shared, so pip sees an empty environment (and never the .venv's qkernels).
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet",
          wheel], cwd=tmp, timeout=300)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     cwd=tmp).stdout.strip())
    (site / "_shared_torch.pth").write_text(str(TORCH_SITE) + "\n")
    outside = tmp / "elsewhere"
    outside.mkdir()
    return {"wheel": wheel, "python": python, "bin": env_dir / "bin", "site": site, "outside": outside}


def _pip_wheel(source: Path, tmp: Path, **env) -> Path:
    """pip wheel of source (the checkout or an sdist) into tmp/wheels, offline; returns the wheel."""
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index", "--quiet",
          "--wheel-dir", tmp / "wheels", source], cwd=tmp, timeout=1800, **env)
    (wheel,) = (tmp / "wheels").glob("qkernels-*.whl")
    return wheel


def _sdist(tmp: Path) -> Path:
    _run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", tmp, "sdist", "--dist-dir", tmp / "dist"],
         cwd=REPO, timeout=300, QKERNELS_CPU_ONLY="1")
    (sdist,) = (tmp / "dist").glob("qkernels-*.tar.gz")
    return sdist


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """The sdist of this checkout, and a wheel of this checkout installed into a fresh venv.

    The wheel is built by pip from the checkout, with the checkout's own configuration, so the compiler
    work of `make build` is reused (ninja finds every object up to date and only links): compiling the
    sources a second time would cost minutes of the suite's budget. That the sdist alone builds a working
    wheel is checked by test_a_wheel_builds_from_the_sdist_alone (QKERNELS_TEST_SDIST_BUILD=1, make
    test-release); here the sdist is checked to carry every file the sources include."""
    tmp = tmp_path_factory.mktemp("packaging")
    sdist = _sdist(tmp)
    with open(REPO / ".build.lock", "a") as lock:  # the lock `make build` holds while it builds
        fcntl.flock(lock, fcntl.LOCK_EX)
        wheel = _pip_wheel(REPO, tmp)
    return {"sdist": sdist, **_install_into_fresh_venv(wheel, tmp)}


def _included_files(source: Path) -> set:
    """Paths (relative to the checkout) of the project headers a csrc file includes with quotes,
    resolved as the compiler does: next to the file, then in csrc/."""
    found = set()
    for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', source.read_text(), re.M):
        for base in (source.parent, REPO / "csrc"):
            if (base / name).is_file():
                found.add((base / name).resolve().relative_to(REPO).as_posix())
                break
    return found


def test_sdist_carries_every_file_the_sources_include(wheel_venv):
    with tarfile.open(wheel_venv["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    sources = [p for ext in ("h", "cuh", "cpp", "cu") for p in (REPO / "csrc").rglob("*." + ext)]
    included = set().union(*(_included_files(p) for p in sources))
    assert "csrc/cpu/int8_gemm.h" in included and "csrc/cuda/mma/igemm.h" in included  # the scan works
    wanted = {p.relative_to(REPO).as_posix() for p in sources} | included
    assert wanted <= names, sorted(wanted - names)
    assert {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "qkernels/_version.py",
            "qkernels/__main__.py", "ssd/main_quant.py"} <= names
    assert not [n for n in names if n.endswith((".so", ".o")) or n.endswith("_build_info.json")]


@pytest.mark.skipif(os.environ.get("QKERNELS_TEST_SDIST_BUILD", "0") in ("", "0"),
                    reason="compiles every source again (minutes): QKERNELS_TEST_SDIST_BUILD=1 / make test-release")
def test_a_wheel_builds_from_the_sdist_alone(tmp_path):
    """A CPU-only wheel built from nothing but the sdist installs and runs ops outside the checkout."""
    sdist = _sdist(tmp_path)
    wheel = _pip_wheel(sdist, tmp_path, QKERNELS_CPU_ONLY="1")
    installed = _install_into_fresh_venv(wheel, tmp_path)
    got = json.loads(_run([installed["python"], "-c", WHEEL_CHECK], cwd=installed["outside"]).stdout)
    assert Path(got["qkernels"]).parent == installed["site"] / "qkernels"
    assert got["cuda_kernels"] is False and got["linear_exact"] and got["scale_equal"]
    assert got["fake_quant_max_err"] <= got["step"] * 1.001


def test_wheel_holds_the_extension_its_record_and_the_console_script(wheel_venv):
    with zipfile.ZipFile(wheel_venv["wheel"]) as whl:
        names = set(whl.namelist())
        record = json.loads(whl.read("qkernels/_build_info.json"))
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = whl.read(entry_points).decode()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = whl.read(metadata).decode()
    assert "qkernels/_C" + EXTENSION_SUFFIXES[0] in names and "ssd/main_quant.py" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]
    assert record == json.loads((PACKAGE / "_build_info.json").read_text())  # the checkout's build
    assert record["torch_version"] == torch.__version__
    assert re.search(r"^qkernels-ssd = ssd\.main_quant:main$", scripts, re.M)
    assert "Version: %s\n" % qkernels.__version__ in meta
    assert "Requires-Dist: torch==%s\n" % torch.__version__.split("+")[0] in meta


def test_wheel_runs_ops_outside_the_checkout(wheel_venv):
    proc = _run([wheel_venv["python"], "-c", WHEEL_CHECK], cwd=wheel_venv["outside"])
    got = json.loads(proc.stdout)
    assert Path(got["qkernels"]).parent == wheel_venv["site"] / "qkernels"
    assert Path(got["ssd"]).parent == wheel_venv["site"] / "ssd"
    assert got["version"] == qkernels.__version__ and got["cuda_kernels"] == qkernels.has_cuda_kernels()
    # within one quantization step (a rounding tie may land on either side in float32)
    assert got["scale_equal"] and got["fake_quant_max_err"] <= got["step"] * 1.001
    assert got["linear_exact"]
    assert "RuntimeWarning" not in proc.stderr


def test_wheel_build_report_and_console_script(wheel_venv):
    report = _run([wheel_venv["python"], "-m", "qkernels"], cwd=wheel_venv["outside"]).stdout
    assert report.splitlines()[0].split() == ["qkernels", qkernels.__version__]
    assert "extension  %s" % (wheel_venv["site"] / "qkernels" / ("_C" + EXTENSION_SUFFIXES[0])) in report
    here = _run([sys.executable, "-m", "qkernels"], cwd=REPO).stdout  # the same build, from the checkout
    cuda_line = [line for line in here.splitlines() if "can run here:" in line]
    assert len(cuda_line) == 1 and cuda_line[0] in report.splitlines()
    assert "running %s (" % torch.__version__ in report and ": same" in report
    usage = _run([wheel_venv["bin"] / "qkernels-ssd", "--help"], cwd=wheel_venv["outside"]).stdout
    assert "--mode" in usage and "--act_quant_type" in usage


def test_checkout_root_wins_over_an_installed_qkernels(wheel_venv):
    """The shared-.venv case in small: an interpreter whose site-packages hold another qkernels still
    imports the checkout's when run from the checkout's root."""
    proc = _run([wheel_venv["python"], "-c", "import qkernels; print(qkernels.__file__)"], cwd=REPO)
    assert proc.stdout.strip() == str(REPO / "qkernels" / "__init__.py")
