"""benchmarks/gpu_check.sh cannot run without a GPU, so what can be checked here is: it parses, and what it
names (benchmark scripts and their options, the sanitizer's test subset) exists. A rename that would make
the one GPU run fail is caught on every `make test`."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
TEXT = SCRIPT.read_text()


def bash_array(name):
    body = re.search(r"^%s=\((.*?)\)$" % name, TEXT, re.M | re.S)
    assert body, "gpu_check.sh has no %s=( ... ) array" % name
    return re.findall(r'"([^"]+)"|(\S+)', body.group(1))


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def options_of(path: Path):
    return set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", path.read_text()))


def test_benchmark_lines_name_scripts_and_options_that_exist():
    common = options_of(REPO / "benchmarks" / "common.py")
    lines = [quoted or bare for quoted, bare in bash_array("GPU_BENCHMARKS")]
    assert lines, "no GPU benchmarks listed"
    for line in lines:
        limit, script, *args = line.split()
        assert int(limit) > 0, line
        path = REPO / "benchmarks" / (script + ".py")
        assert path.is_file(), "%s: no benchmarks/%s.py" % (line, script)
        unknown = {a for a in args if a.startswith("--")} - options_of(path) - common
        assert not unknown, "%s: %s takes no option %s" % (line, script, sorted(unknown))
    # what the script itself passes to every benchmark
    assert {"--device", "--results-dir"} <= common


def test_sanitizer_subset_names_tests_that_exist():
    subset = [quoted or bare for quoted, bare in bash_array("SUBSET")]
    assert subset
    for node in subset:
        path, name = node.split("::")
        assert re.search(r"^def %s\(" % re.escape(name), (REPO / path).read_text(), re.M), node
