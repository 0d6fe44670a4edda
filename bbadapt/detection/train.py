"""Train a bbadapt Faster R-CNN bundle with gluoncv's own detection training pieces.

What gluoncv's ``train_faster_rcnn.py`` does, for any bundle instead of its predefined
networks: gluoncv's train transform (resize, flip, RPN targets on CPU) set up for the
bundle's *input spec* (no normalization step at all for an ``rgb255`` detector), its
``FasterRCNNTrainBatchify``, its ``ForwardBackwardTask`` (RPN and R-CNN losses), SGD over
the bundle's ``train_patterns`` only, linear warmup then step decay, MXNet data parallel
over several GPUs or Horovod across machines (``--horovod``: see :mod:`bbadapt.detection.distributed`).

Checkpoints are directories under ``DIR/checkpoints/`` (``epoch-NNNN``, ``last``, ``best``),
each a loadable bundle (``load_detector`` works on it) plus ``trainer.states``, written
atomically: a failed or interrupted run never leaves a half-written checkpoint, and
never touches the ones already there. ``DIR/train.log.jsonl`` gets one JSON record per
logged iteration and per validation.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Optional

from bbadapt.core.errors import BbadaptError, DeviceError, OptionError, OutputError
from bbadapt.core.zoo import import_gluoncv
from bbadapt.detection.detector_bundle import save_detector_params
from bbadapt.detection.distributed import Workers, epoch_sampler
from bbadapt.detection.runtime import check_proposals, detector_manifest, load_quietly, params_file

import_gluoncv()  # gluoncv is imported lazily below; this makes it work beside torch >= 2

CHECKPOINTS = "checkpoints"
LOG = "train.log.jsonl"
STATES = "trainer.states"
LOSSES = ("rpn_cls", "rpn_box", "rcnn_cls", "rcnn_box")


@dataclass
class TrainConfig:
    """Every setting of a run; stored in each checkpoint so a resumed run continues the same schedule."""

    epochs: int = 2
    lr: float = 0.01
    momentum: float = 0.9
    wd: float = 1e-4
    lr_steps: tuple[int, ...] = ()  # epochs at which lr *= lr_decay
    lr_decay: float = 0.1
    warmup_iters: int = 0  # linear warmup over the first iterations of epoch 0
    warmup_factor: float = 1 / 3
    batch_size: int = 1  # images per step over all devices and workers (the global batch)
    short_side: int = 600
    max_size: int = 1000
    flip_p: float = 0.5
    checkpoint_every: int = 1
    val_interval: int = 1
    log_interval: int = 10
    seed: int = 0
    hybridize: bool = True
    amp: bool = False
    num_workers: int = 0
    train_split: str = "train"
    val_split: str = "val"
    dataset: str = ""
    val_dataset: Optional[str] = None
    devices: list[str] = field(default_factory=list)

    def check(self) -> None:
        positive = {"epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size, "short_side": self.short_side,
                    "max_size": self.max_size, "checkpoint_every": self.checkpoint_every,
                    "val_interval": self.val_interval, "log_interval": self.log_interval}
        for name, value in positive.items():
            if not value > 0:
                raise OptionError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.max_size < self.short_side:
            raise OptionError(f"--max-size ({self.max_size}) must be at least --short-side ({self.short_side})")
        if not 0 <= self.flip_p <= 1 or self.warmup_iters < 0 or self.lr_decay <= 0 or self.num_workers < 0:
            raise OptionError("flip probability must be in [0, 1]; warmup iterations, workers >= 0; lr decay > 0")


# ----------------------------------------------------------------------------- devices




# ----------------------------------------------------------------------------- bundle and checkpoints


@contextlib.contextmanager
def _writing(target: Path) -> Iterator[Path]:
    """A staged checkpoint directory; a failed write (disk full ...) is one line and leaves the others intact."""
    from bbadapt.core.atomic import staged_directory

    try:
        with staged_directory(target, force=True, what="checkpoint") as stage:
            yield stage
    except OSError as exc:
        raise OutputError(f"cannot write checkpoint {target}: {exc.strerror or exc}; "
                          "the checkpoints written before are intact") from None


def write_checkpoint(target: Path, net, trainer, manifest: dict, section: dict) -> None:
    """One checkpoint directory (manifest + parameters + optimizer state), atomically."""
    with _writing(target) as stage:
        save_detector_params(net, stage / params_file(manifest))
        trainer.save_states(str(stage / STATES))
        (stage / "manifest.json").write_text(json.dumps({**manifest, "checkpoint": section}, indent=2) + "\n")


def copy_checkpoint(source: Path, target: Path) -> None:
    """``last``/``best`` as full copies (not links: they must survive pruning of ``epoch-*``)."""
    with _writing(target) as stage:
        for item in source.iterdir():
            shutil.copy2(item, stage / item.name)


def read_checkpoint(directory: Path) -> dict:
    manifest = detector_manifest(directory)
    section = manifest.get("checkpoint")
    if not isinstance(section, dict) or not {"epoch", "iteration", "config"} <= set(section):
        raise OutputError(f"{directory} is not a bbadapt training checkpoint (no checkpoint section)")
    for name in (params_file(manifest), STATES):
        if not (directory / name).is_file():
            raise OutputError(f"checkpoint {directory} lacks {name}")
    return manifest


# ----------------------------------------------------------------------------- schedule


def learning_rate(config: TrainConfig, epoch: int, batch: int) -> float:
    """The lr at ``batch`` of ``epoch``: linear warmup from ``warmup_factor`` over the first
    ``warmup_iters`` iterations of epoch 0 (as gluoncv's script), times ``lr_decay`` per step passed.

    A pure function of the position, so a resumed run continues the schedule exactly.
    """
    lr = config.lr * config.lr_decay ** sum(1 for s in config.lr_steps if epoch >= s)
    if epoch == 0 and config.warmup_iters and batch < config.warmup_iters:
        alpha = batch / config.warmup_iters
        lr *= config.warmup_factor * (1 - alpha) + alpha
    return lr


# ----------------------------------------------------------------------------- progress


@contextlib.contextmanager
def console_progress(console) -> Iterator[Callable[[dict], None]]:
    """A rich progress bar (loss components, samples/s) on a terminal; plain lines otherwise.

    Plain lines are printed for logged iterations, validations and checkpoints only, so a CI
    log gets what ``train.log.jsonl`` gets, readable.
    """
    if console.is_terminal:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        columns = (TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[losses]}"), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task("train", total=None, epoch="-", losses="")
            yield lambda record: _bar_update(bar, task, console, record)
    else:
        yield lambda record: _plain_line(console, record)


def _loss_text(record: dict) -> str:
    parts = " ".join(f"{k}={record[k]:.3f}" for k in LOSSES)
    return f"loss={record['loss']:.3f} ({parts}) lr={record['lr']:.2e} {record['samples_per_s']:.2f} samples/s"


def _bar_update(bar, task, console, record: dict) -> None:
    if record["event"] == "iter":
        bar.update(task, completed=record["batch"] + 1, total=record["batches"], epoch=record["epoch"],
                   losses=_loss_text(record))
    else:
        _plain_line(console, record)


def _plain_line(console, record: dict) -> None:
    event = record["event"]
    if event == "iter" and record.get("logged"):
        line = f"epoch {record['epoch']} batch {record['batch'] + 1}/{record['batches']}: {_loss_text(record)}"
    elif event == "epoch":
        line = f"epoch {record['epoch']} done ({record['batches']} batches, {record['workers']} worker(s)): {_loss_text(record)}"
    elif event == "val":
        line = f"epoch {record['epoch']} validation: {record['metric']} mAP {record['map']:.4f}"
    elif event == "checkpoint":
        line = f"checkpoint {record['path']}{' (new best)' if record['best'] else ''}"
    else:
        return
    console.print(line, markup=False, highlight=False)


# ----------------------------------------------------------------------------- the run


class _Log:
    """``train.log.jsonl`` (rank 0 only) plus the progress callback."""

    def __init__(self, path: Optional[Path], progress: Optional[Callable[[dict], None]]):
        self.path, self.progress = path, progress

    def __call__(self, record: dict, write: bool = True) -> None:
        record = {"time": datetime.now(UTC).isoformat(timespec="seconds"), **record}
        if write and self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.progress:
            self.progress({**record, "logged": write})


def train(bundle_dir: str | os.PathLike, dataset: str, *, epochs: int = 2, lr: float = 0.01,
          lr_steps: Sequence[int] = (), lr_decay: float = 0.1, warmup_iters: int = 0, batch_size: int = 1,
          ctx: Optional[list] = None, amp: bool = False, hybridize: bool = True, short_side: int = 600,
          max_size: int = 1000, checkpoint_every: int = 1, val_interval: int = 1, log_interval: int = 10,
          resume: bool = False, seed: int = 0, horovod: bool = False, val_dataset: Optional[str] = None,
          flip_p: float = 0.5, num_workers: int = 0, momentum: float = 0.9, wd: float = 1e-4,
          train_split: str = "train", val_split: str = "val",
          progress: Optional[Callable[[dict], None]] = None) -> dict:
    """Train the detector bundle at ``bundle_dir`` on ``dataset`` (``voc:DIR`` or ``coco:ANN.json[:IMAGES]``).

    VOC data trains on split ``train_split`` and validates on ``val_split`` (of ``val_dataset``
    if given, else of ``dataset``); COCO data validates on
    ``val_dataset`` (default: the training file itself). ``ctx``: a list of mxnet contexts
    (see :func:`bbadapt.core.devices.contexts`; default CPU). ``resume`` continues from ``checkpoints/last``
    (epoch, optimizer state, lr schedule position); without it, existing checkpoints are
    refused, never overwritten. ``progress`` receives every iteration/validation record.
    Returns a summary dict (epochs and iterations done, last losses, best mAP, checkpoints).
    """
    config = TrainConfig(epochs=epochs, lr=lr, lr_steps=tuple(sorted(lr_steps)), lr_decay=lr_decay,
                         warmup_iters=warmup_iters, batch_size=batch_size, short_side=short_side, max_size=max_size,
                         flip_p=flip_p, checkpoint_every=checkpoint_every, val_interval=val_interval,
                         log_interval=log_interval, seed=seed, hybridize=hybridize, amp=amp, num_workers=num_workers,
                         dataset=str(dataset), val_dataset=val_dataset, momentum=momentum, wd=wd,
                         train_split=train_split, val_split=val_split)
    config.check()
    bundle_dir = Path(bundle_dir)
    manifest = detector_manifest(bundle_dir)
    if bundle_dir.resolve().parent.name == CHECKPOINTS and "checkpoint" in manifest:
        raise OutputError(f"{bundle_dir} is a training checkpoint; continue its run with "
                          f"`bbadapt train {bundle_dir.resolve().parent.parent} --resume`")
    manifest.pop("checkpoint", None)
    workers = Workers.horovod() if horovod else Workers()
    ctx = workers.contexts(ctx)
    config.devices = [str(c) for c in ctx]
    if amp and any(c.device_type != "gpu" for c in ctx):
        raise DeviceError("--amp (mixed precision) needs GPUs; MXNet 1.9.1's CPU AMP (bfloat16) "
                          "fails at the first convolution without AVX-512 (see docs/gpu.md)")
    per_worker = workers.per_worker_batch(config.batch_size, len(ctx))
    start = _start_state(bundle_dir, resume)  # every worker: all must stop, or none
    if start is not None:
        _same_run(config, start.get("config", {}))
    data, val = _datasets(manifest, config)
    if amp:
        from mxnet.contrib import amp as mx_amp

        mx_amp.init()
    net = _load_net(bundle_dir if start is None else start["dir"], ctx, per_worker // len(ctx))
    check_proposals(net, config.short_side)
    with workers.failures():
        trainer = _trainer(net, config, ctx, workers)
        if start is not None:
            trainer.load_states(str(start["dir"] / STATES))
        log = _Log(bundle_dir / LOG, progress) if workers.root else _Log(None, None)  # rank 0 alone logs
        run = _Run(net, trainer, ctx, config, manifest, bundle_dir, log, workers, data, val, start)
        return run.fit()


RESUME_MUST_MATCH = ("lr", "momentum", "wd", "lr_steps", "lr_decay", "warmup_iters", "warmup_factor", "batch_size",
                     "short_side", "max_size", "flip_p", "seed", "dataset", "val_dataset", "train_split", "val_split")


def _same_run(config: TrainConfig, stored: dict) -> None:
    """--resume continues the stored run exactly: refuse settings that would silently change it."""
    given = json.loads(json.dumps(_config_dict(config)))
    differ = [f"{key} {given.get(key)!r} (the run used {stored[key]!r})" for key in RESUME_MUST_MATCH
              if key in stored and given.get(key) != stored[key]]
    if differ:
        raise OptionError("--resume continues the checkpointed run, but these settings differ from it: "
                          + "; ".join(differ) + " (pass the run's values; only --epochs may grow)")


def _start_state(bundle_dir: Path, resume: bool) -> Optional[dict]:
    checkpoints = bundle_dir / CHECKPOINTS
    if not resume:
        if checkpoints.is_dir() and any(p.name in ("last", "best") or p.name.startswith("epoch-")
                                                  for p in checkpoints.iterdir()):
            raise OutputError(f"{checkpoints} holds checkpoints of an earlier run; pass --resume to continue it, "
                              "or move them away")
        return None
    last = checkpoints / "last"
    if not last.is_dir():
        raise OutputError(f"nothing to resume: {last} does not exist")
    manifest = read_checkpoint(last)
    return {"dir": last, **manifest["checkpoint"]}


def _datasets(manifest: dict, config: TrainConfig):
    from bbadapt.detection.datasets import open_dataset, parse_dataset

    classes = manifest["detector"]["classes"]
    spec = parse_dataset(config.dataset)
    data = open_dataset(spec, classes, config.train_split, drop_empty=True)
    val_spec = parse_dataset(config.val_dataset) if config.val_dataset else spec
    val = open_dataset(val_spec, classes, config.val_split)
    return data, val


def _load_net(directory: Path, ctx: list, per_device: int):
    net = load_quietly(directory, ctx)
    if per_device != net._batch_size:
        _set_per_device_batch(net, per_device)
    return net


def _set_per_device_batch(net, n: int) -> None:
    """gluoncv fixes the images per device when a FasterRCNN is built (``per_device_batch_size``);
    a bundle is built with 1, so set the three places that read it before the first forward."""
    from gluoncv.model_zoo.rcnn.faster_rcnn.rcnn_target import RCNNTargetGenerator

    net._batch_size = n
    net.sampler._num_image = n
    net._target_generator = lambda: RCNNTargetGenerator(net.num_class, net.sampler._max_pos, n)


def _trainer(net, config: TrainConfig, ctx: list, workers: Workers):
    """SGD over the bundle's trainable parameters only (``train_patterns``), as gluoncv's script."""
    import mxnet as mx

    net.collect_params().setattr("grad_req", "null")
    # a name -> Parameter dict: horovod's DistributedTrainer sorts a *list* of Parameters, which fails
    trainable = {name: p for name, p in net.collect_train_params().items() if not isinstance(p, mx.gluon.Constant)}
    for p in trainable.values():  # Constants (anchors) never train, whatever a pattern matches
        p.grad_req = "write"
    options = {"learning_rate": config.lr, "wd": config.wd, "momentum": config.momentum}
    if config.amp:
        options["multi_precision"] = True
    workers.broadcast(net.collect_params())
    trainer = workers.trainer(trainable, "sgd", options, kvstore="device" if len(ctx) > 1 else None,
                              update_on_kvstore=False if config.amp else None)
    if config.amp:
        from mxnet.contrib import amp

        amp.init_trainer(trainer)
    return trainer


class _Run:
    """One training run: epochs of steps, validation, checkpoints."""

    def __init__(self, net, trainer, ctx, config, manifest, bundle_dir, log, workers, data, val, start):
        self.net, self.trainer, self.ctx, self.config = net, trainer, ctx, config
        self.manifest, self.dir, self.log, self.workers = manifest, bundle_dir, log, workers
        self.data, self.val = data, val
        self.rank0 = workers.root
        self.per_worker = config.batch_size // workers.size
        self.epoch = start["epoch"] if start else 0
        self.iteration = start["iteration"] if start else 0
        self.best = start.get("best_map") if start else None
        self.checkpoints: list[str] = []
        self.last_losses: dict = {}

    def fit(self) -> dict:
        from gluoncv.data.batchify import FasterRCNNTrainBatchify
        from gluoncv.model_zoo.rcnn.faster_rcnn.data_parallel import ForwardBackwardTask
        from mxnet import gluon

        losses = (gluon.loss.SigmoidBinaryCrossEntropyLoss(from_sigmoid=False), gluon.loss.HuberLoss(rho=1 / 9),
                  gluon.loss.SoftmaxCrossEntropyLoss(), gluon.loss.HuberLoss(rho=1.0))  # gluoncv's script defaults
        task = ForwardBackwardTask(self.net, self.trainer, *losses, mix_ratio=1.0, amp_enabled=self.config.amp)
        batchify = FasterRCNNTrainBatchify(self.net, len(self.ctx))
        start_epoch = self.epoch
        for epoch in range(start_epoch, self.config.epochs):
            loader = self._loader(batchify, epoch)  # before seeding: it moves the sampler on
            self._seed(epoch)
            self._epoch(epoch, loader, task)
            self.epoch = epoch + 1
            val_map = self._validate() if self.epoch % self.config.val_interval == 0 else None
            if self.rank0:
                self._save(val_map)
        digests = self.workers.finish(self.net)  # no worker returns before all are done (see distributed.py)
        self.log({"event": "finish", "epoch": self.epoch, "iteration": self.iteration, "workers": self.workers.size,
                  "param_digests": digests})
        return {"epochs": self.epoch, "iterations": self.iteration, "started_at_epoch": start_epoch,
                "losses": self.last_losses, "best_map": self.best, "checkpoints": self.checkpoints,
                "log": str(self.dir / LOG), "rank": self.workers.rank, "workers": self.workers.size,
                "param_digests": digests}

    def _seed(self, epoch: int) -> None:
        """Seed python, numpy and mxnet per epoch: a resumed epoch draws what an uninterrupted one would."""
        from gluoncv.utils import random as grandom

        grandom.seed(self.config.seed * 1000 + epoch)

    def _loader(self, batchify, epoch: int):
        import mxnet as mx

        from bbadapt.core.spec import InputSpec
        from bbadapt.detection.datasets import spec_transforms

        sampler = epoch_sampler(self.data.get_im_aspect_ratio(), self.per_worker, self.workers, self.config.seed, epoch)
        transform = spec_transforms(InputSpec.from_dict(self.manifest["target"]), self.config.short_side,
                                    self.config.max_size, self.net, train=True, flip_p=self.config.flip_p,
                                    ashape=self.net.ashape)
        return mx.gluon.data.DataLoader(self.data.transform(transform), batch_sampler=sampler, batchify_fn=batchify,
                                        num_workers=self.config.num_workers)

    def _epoch(self, epoch: int, loader, task) -> None:
        if self.config.hybridize:
            self.net.hybridize(static_alloc=True)
        steps = len(loader)
        window = {k: 0.0 for k in LOSSES}
        totals = {k: 0.0 for k in LOSSES}
        tic, seen = time.time(), 0
        for batch_index, batch in enumerate(loader):
            self.trainer.set_learning_rate(learning_rate(self.config, epoch, batch_index))
            results = [task.forward_backward(shard) for shard in self._shards(batch)]
            self.trainer.step(self.per_worker)  # horovod's trainer divides by the workers too: the global mean
            self.iteration += 1
            seen += self.config.batch_size  # all workers' images: samples/s is the job's throughput
            for k, name in enumerate(LOSSES):
                value = sum(float(r[k].asscalar()) for r in results) / len(results)
                window[name] += value
                totals[name] += value
            n_window = (batch_index % self.config.log_interval) + 1
            record = {"event": "iter", "epoch": epoch, "batch": batch_index, "batches": steps,
                      "iteration": self.iteration, "lr": self.trainer.learning_rate,
                      **{k: v / n_window for k, v in window.items()}}
            record["loss"] = sum(record[k] for k in LOSSES)
            record["samples_per_s"] = seen / max(time.time() - tic, 1e-9)
            self._check_finite(record)
            logged = n_window == self.config.log_interval or batch_index == steps - 1
            self.log(record, write=logged and self.rank0)
            if logged:
                self.last_losses = {k: record[k] for k in (*LOSSES, "loss")}
                window = {k: 0.0 for k in LOSSES}
        means = {k: v / max(steps, 1) for k, v in totals.items()}
        self.log({"event": "epoch", "epoch": epoch, "iteration": self.iteration, "batches": steps,
                  "lr": self.trainer.learning_rate, **means,
                  "loss": sum(means.values()), "samples_per_s": seen / max(time.time() - tic, 1e-9),
                  "seconds": time.time() - tic, "workers": self.workers.size})

    def _shards(self, batch):
        """Batchify already split the batch per device: move each shard to its device."""
        per_device = [elem if isinstance(elem, (list, tuple)) else [elem] for elem in batch]  # 1 device: plain arrays
        return [[part.as_in_context(c) for part in shard] for shard, c in
                zip(zip(*per_device, strict=True), self.ctx, strict=True)]

    def _check_finite(self, record: dict) -> None:
        if not math.isfinite(record["loss"]):
            raise BbadaptError(f"training diverged at epoch {record['epoch']} batch {record['batch']} "
                               f"(loss {record['loss']}); lower --lr or add warmup. Checkpoints so far are intact")

    def _validate(self) -> Optional[float]:
        """VOC07 mAP on the validation set (rank 0; the other workers skip it, as gluoncv's script)."""
        if not self.rank0:
            return None
        from bbadapt.core.spec import InputSpec
        from bbadapt.detection.evaluate import predictions, score

        if self.config.hybridize:
            self.net.hybridize(static_alloc=True)  # the inference graph differs from the training one
        preds = predictions(self.net, self.val, self.ctx[0], InputSpec.from_dict(self.manifest["target"]),
                            self.config.short_side, self.config.max_size)
        result = score(self.val, preds, "voc07")
        self.log({"event": "val", "epoch": self.epoch - 1, "iteration": self.iteration, "metric": "voc07",
                  "map": result["map"], "per_class": result["per_class"]})
        return result["map"]

    def _save(self, val_map: Optional[float]) -> None:
        root = self.dir / CHECKPOINTS
        improved = val_map is not None and (self.best is None or val_map > self.best)
        if improved:
            self.best = val_map
        section = {"epoch": self.epoch, "iteration": self.iteration, "val_map": val_map, "best_map": self.best,
                   "val_metric": "voc07", "dataset": self.config.dataset, "config": _config_dict(self.config)}
        due = self.epoch % self.config.checkpoint_every == 0 or self.epoch == self.config.epochs
        written = root / f"epoch-{self.epoch:04d}"
        if due:
            write_checkpoint(written, self.net, self.trainer, self.manifest, section)
            self.checkpoints.append(str(written))
            copy_checkpoint(written, root / "last")
        else:
            write_checkpoint(root / "last", self.net, self.trainer, self.manifest, section)
            written = root / "last"
        if improved:
            copy_checkpoint(written, root / "best")
        self.log({"event": "checkpoint", "epoch": self.epoch, "iteration": self.iteration, "path": str(written),
                  "val_map": val_map, "best": improved})


def _config_dict(config: TrainConfig) -> dict:
    d = asdict(config)
    d["lr_steps"] = list(config.lr_steps)
    return d
