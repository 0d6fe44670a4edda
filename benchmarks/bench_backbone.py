"""Is freezing BatchNorm as constants (or folding it into the conv) worth it? Measured on CPU.

bbadapt offers three frozen-BN forms. The claim behind ``bn="fused"`` is that a backbone
fine-tuned with frozen BN (a detector's usual setting) trains faster than gluoncv's
``use_global_stats`` BatchNorm and infers about as fast as a net without BN at all. This
script checks that claim for ``resnet50_v1b`` and ``resnet50_v2`` at 512x512, batch 1:

* variants, all from the same calibrated random weights: ``global-stats`` (gluoncv-style,
  ``adapt(net, spec, spec, bn="global-stats")`` so only the BN changes), ``affine``,
  ``fused``, and a ``no-BN floor`` (every BN replaced by an identity: NOT equivalent, only
  the lower bound of what removing BN could buy);
* inference (hybridized, static_alloc/static_shape) and a training step (forward +
  backward of a sum loss, frozen constants with grad_req 'null', convs 'write');
* variants are timed round-robin, one run each in turn, so that a noisy neighbour slows
  all of them alike instead of one variant's whole block; medians are reported.

Part two times ``bbadapt convert resnet152_v2 --weights random`` (the deepest core model)
as a subprocess: wall time and peak RSS against the targets < 60 s and < 3 GB.
Misses are printed, never turned into an exit status: CPU timings here are information.

    python benchmarks/bench_backbone.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet import autograd
from mxnet.gluon import nn

from bbadapt.core import zoo
from bbadapt.core.blocks import Identity, replace_block
from bbadapt.core.rewrite import adapt, clone
from bbadapt.core.trace import block_paths, trace
from bbadapt.pipeline import load_source

MODELS = ("resnet50_v1b", "resnet50_v2")
VARIANTS = ("global-stats", "affine", "fused", "no-BN floor")
SIZE = 512
TRAIN_TARGET = 1.15  # training step: global-stats / fused >= this
INFER_TARGET = 1.05  # inference: fused / floor <= this
CONVERT_MODEL, CONVERT_WALL_S, CONVERT_RSS_GB = "resnet152_v2", 60.0, 3.0


def check_grad_reqs(net, variant: str) -> None:
    """Convs and the classifier train ('write'); every other (frozen BN) parameter is 'null'."""
    for path, block in block_paths(net).items():
        want = "write" if isinstance(block, (nn.Conv2D, nn.Dense)) else "null"
        for param in block._reg_params.values():
            if param.grad_req != want:
                raise SystemExit(f"{variant}: {path} {param.name} has grad_req {param.grad_req!r}, expected {want!r}")


def no_bn_floor(net):
    """The net with every BatchNorm replaced by an identity: a lower bound, not an equivalent."""
    floor = clone(net)
    for path in trace(floor).bn_order:
        replace_block(floor, path, Identity())
    return floor


def build_variants(name: str) -> dict[str, object]:
    """All four variants of ``name`` from the same seeded weights, hybridized and checked."""
    net = load_source(name, "random", seed=0).net
    spec = zoo.model_info(name).source_spec
    nets = {bn: adapt(net, spec, spec, bn=bn).net for bn in VARIANTS[:3]}
    nets["no-BN floor"] = no_bn_floor(net)
    for variant, variant_net in nets.items():
        check_grad_reqs(variant_net, variant)
        variant_net.hybridize(static_alloc=True, static_shape=True)
    return nets


def infer(net, x: mx.nd.NDArray) -> None:
    net(x)
    mx.nd.waitall()


def train_step(net, x: mx.nd.NDArray) -> None:
    with autograd.record():
        loss = net(x).sum()
    loss.backward()
    mx.nd.waitall()


def check_gradients_flow(net, variant: str) -> None:
    """After a training step every trainable parameter must have received a gradient."""
    dead = [p.name for p in net.collect_params().values()
            if p.grad_req != "null" and not np.any(p.grad().asnumpy())]
    if dead:
        raise SystemExit(f"{variant}: {len(dead)} trainable parameters got no gradient, e.g. {dead[:3]}")


def round_robin(nets: dict[str, object], step: Callable, x: mx.nd.NDArray, warmup: int, runs: int) -> dict[str, float]:
    """Median seconds per variant; each round runs every variant once, in a rotating order."""
    names = list(nets)
    for _ in range(warmup):
        for name in names:
            step(nets[name], x)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(runs):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            step(nets[name], x)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


Timings = dict[str, dict[str, float]]  # "infer"/"train" -> variant -> median seconds


def bench_model(name: str, warmup: int, runs: int) -> Timings:
    """Median inference and training-step time of every variant of one model."""
    nets = build_variants(name)
    x = mx.nd.random.uniform(0, 255, shape=(1, 3, SIZE, SIZE))
    infer_s = round_robin(nets, infer, x, warmup, runs)
    for variant, net in nets.items():  # a trainable parameter silently left without gradient is a bug
        train_step(net, x)
        check_gradients_flow(net, variant)
    return {"infer": infer_s, "train": round_robin(nets, train_step, x, warmup, runs)}


def print_table(results: dict[str, Timings]) -> None:
    """One row per variant, the models side by side; then the target ratios."""
    header = f"{'variant':<13}" + "".join(f"| {name:<38}" for name in results)
    sub = f"{'':<13}" + f"| {'infer ms':>9}{'/floor':>7}{'train ms':>10}{'gs/this':>9}   " * len(results)
    print(header, sub, "-" * len(sub), sep="\n")
    for variant in VARIANTS:
        cells = ""
        for t in results.values():
            inf, trn = t["infer"], t["train"]
            cells += (f"| {inf[variant] * 1e3:>9.1f}{inf[variant] / inf['no-BN floor']:>7.3f}"
                      f"{trn[variant] * 1e3:>10.1f}{trn['global-stats'] / trn[variant]:>9.3f}   ")
        print(f"{variant:<13}{cells}")
    for name, t in results.items():
        inf, trn = t["infer"], t["train"]
        train_ratio, infer_ratio = trn["global-stats"] / trn["fused"], inf["fused"] / inf["no-BN floor"]
        print(f"\n{name}")
        print(f"  train  global-stats/fused  = {train_ratio:.3f}  (target >= {TRAIN_TARGET})  {verdict(train_ratio >= TRAIN_TARGET)}")
        print(f"  train  global-stats/affine = {trn['global-stats'] / trn['affine']:.3f}  (information)")
        print(f"  infer  fused/floor         = {infer_ratio:.3f}  (target <= {INFER_TARGET})  {verdict(infer_ratio <= INFER_TARGET)}")
        print(f"  infer  affine/floor        = {inf['affine'] / inf['no-BN floor']:.3f}  (information)")


def bench_convert() -> None:
    """Wall time and peak RSS of the CLI converting the deepest core model, in a subprocess."""
    exe = shutil.which("bbadapt") or str(Path(sys.executable).with_name("bbadapt"))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [exe, "convert", CONVERT_MODEL, "--weights", "random", "--out", f"{tmp}/r152", "--force"]
        timer = Path("/usr/bin/time")
        if timer.exists():
            cmd = [str(timer), "-v", *cmd]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    rss_kb = int(found.group(1)) if found else resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    rss_gb = rss_kb * 1024 / 1e9
    print(f"\nbbadapt convert {CONVERT_MODEL} --weights random  (exit {proc.returncode}"
          f"{', peak RSS via /usr/bin/time' if found else ', peak RSS via getrusage'})")
    print(f"  wall time {wall:6.1f} s   (target < {CONVERT_WALL_S:.0f} s)   {verdict(wall < CONVERT_WALL_S)}")
    print(f"  peak RSS  {rss_gb:6.2f} GB  (target < {CONVERT_RSS_GB:.0f} GB)   {verdict(rss_gb < CONVERT_RSS_GB)}")
    if proc.returncode != 0:
        print("  " + "\n  ".join((proc.stdout + proc.stderr).strip().splitlines()[-5:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions, skip the convert timing (smoke run)")
    args = parser.parse_args()
    warmup, runs = (1, 3) if args.quick else (2, 11)
    print(f"mxnet {mx.__version__}, {os.cpu_count()} CPUs ({platform.machine()}), "
          f"MKLDNN {'on' if mx.runtime.Features().is_enabled('MKLDNN') else 'off'}")
    print(f"{SIZE}x{SIZE}, batch 1, CPU; median of {runs} round-robin runs after {warmup} warm-up\n")
    print_table({name: bench_model(name, warmup, runs) for name in MODELS})
    if not args.quick:
        bench_convert()


if __name__ == "__main__":
    main()
