"""The check's memory is known before it allocates: huge --sizes are refused with the estimate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bbadapt.core import zoo
from bbadapt.verify.budget import activation_elements_per_pixel, available_bytes

REPO = Path(__file__).resolve().parents[2]


def test_the_estimate_is_above_what_the_check_really_grows_by():
    """Measured in a fresh process by sampling its resident size every millisecond while the check runs.

    Not ru_maxrss: the build before the check can peak higher than the check itself (a CI run measured
    a growth of 0 that way), and some sandboxes do not keep that counter at all."""
    code = (
        "import os, threading, time\n"
        "from bbadapt.core import zoo\nfrom bbadapt.core.rewrite import adapt\n"
        "from bbadapt.verify.equivalence import CheckOptions, check\n"
        "from bbadapt.verify.budget import activation_elements_per_pixel, check_bytes\n"
        "page = os.sysconf('SC_PAGE_SIZE')\n"
        "def resident():\n"
        "    with open('/proc/self/statm') as f:\n"
        "        return int(f.read().split()[1]) * page\n"
        "net = zoo.build('resnet18_v1'); a = adapt(net, 'imagenet', 'rgb255')\n"
        "est = check_bytes(activation_elements_per_pixel(net), [(384, 384)], 6)\n"
        "before = resident(); peak = [before]; done = threading.Event()\n"
        "def sample():\n"
        "    while not done.is_set():\n"
        "        peak[0] = max(peak[0], resident()); time.sleep(0.001)\n"
        "sampler = threading.Thread(target=sample); sampler.start()\n"
        "check(net, 'imagenet', a, options=CheckOptions(sizes=[(384, 384)]))\n"
        "done.set(); sampler.join()\n"
        "print(est, max(peak[0], resident()) - before)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    estimate, growth = map(int, result.stdout.split()[-2:])
    assert growth > 0 and estimate >= growth, (estimate, growth)
    assert estimate < 4 * growth, "an estimate far above reality would refuse sizes that fit"


def test_activations_per_pixel_grow_with_depth_and_width():
    small, big = (activation_elements_per_pixel(zoo.build(n)) for n in ("resnet18_v1", "resnet50_v1b"))
    assert 50 < small < big


def test_available_memory_is_a_positive_number_of_bytes():
    assert 0 < available_bytes() < 1 << 50


def test_sizes_far_beyond_memory_are_refused_before_allocating(tmp_path):
    args = [sys.executable, "-m", "bbadapt.cli", "convert", "resnet18_v1", "--weights", "random",
            "--sizes", "100000x100000", "--out", str(tmp_path / "out")]
    # the CLI runs under a small wrapper that reports its child's peak RSS (RUSAGE_CHILDREN of this
    # pytest worker would include every other test's subprocesses)
    wrapper = ("import resource, subprocess, sys\n"
               "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "sys.stderr.write(r.stderr)\n"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
               "sys.exit(r.returncode)\n")
    result = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("bbadapt: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "the check at 100000x100000 needs about" in errors[0] and "choose smaller --sizes" in errors[0]
    assert int(result.stdout.split()[-1]) < 3 * 2**20  # kB: the CLI's peak stays well under 3 GB
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
