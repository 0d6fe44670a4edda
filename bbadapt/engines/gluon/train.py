"""Train a bbadapt Faster R-CNN bundle with gluoncv's own detection training pieces.

What gluoncv's ``train_faster_rcnn.py`` does, for any bundle instead of its predefined
networks: gluoncv's train transform (resize, flip, RPN targets on CPU) set up for the
bundle's *input spec* (no normalization step at all for an ``rgb255`` detector), its
``FasterRCNNTrainBatchify``, its ``ForwardBackwardTask`` (RPN and R-CNN losses), SGD over
the bundle's ``train_patterns`` only, linear warmup then step decay, MXNet data parallel
over several GPUs or Horovod across machines (``--horovod``: see :mod:`bbadapt.engines.gluon.distributed`).

Checkpoints are directories under ``DIR/checkpoints/`` (``epoch-NNNN``), each a loadable
bundle (``load_detector`` works on it) plus ``trainer.states``, written atomically: a failed
or interrupted run never leaves a half-written checkpoint, and never touches the ones
already there. ``last`` and ``best`` are relative symbolic links naming an epoch directory
(swapped atomically), not copies: a checkpoint of a ResNet-18 detector is ~100 MB.
``DIR/train.log.jsonl`` gets one JSON record per logged iteration and per validation.

Epochs are counted from 1 wherever a person or a file sees them (progress lines, the log,
errors, ``epoch-0001``); the schedule and the per-epoch seeding count from 0 internally.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from bbadapt.bundle.manifest import store_manifest
from bbadapt.bundle.schema import (
    BEST,
    CHECKPOINTS,
    EPOCH_PREFIX,
    LAST,
    TRAIN_LOG,
    TRAINER_STATES,
    BundleManifest,
    CheckpointSection,
    epoch_name,
)
from bbadapt.core.zoo import import_gluoncv
from bbadapt.engines.common.checkpoints import point_reference, prune, referenced, resume_point  # noqa: F401
from bbadapt.engines.common.progress import Log as _Log  # noqa: F401
from bbadapt.engines.common.progress import console_progress  # noqa: F401 - the CLI's, shared by both engines
from bbadapt.engines.common.schedule import LOSS_LIMIT, LOSSES, WEIGHT_GROWTH_LIMIT, learning_rate  # noqa: F401
from bbadapt.engines.gluon.detector_bundle import save_detector_params
from bbadapt.engines.gluon.distributed import Workers, epoch_sampler
from bbadapt.engines.gluon.options import TrainConfig, resolve_batch_size, resolve_schedule
from bbadapt.engines.gluon.runtime import check_proposals, detector_manifest, load_quietly
from bbadapt.platform.errors import BbadaptError, DeviceError, OptionError, OutputError

import_gluoncv()  # gluoncv is imported lazily below; this makes it work beside torch >= 2

LOG = TRAIN_LOG  # the names this module always exported; the files are named in bbadapt.bundle.schema
STATES = TRAINER_STATES


# ----------------------------------------------------------------------------- devices




# ----------------------------------------------------------------------------- bundle and checkpoints


@contextlib.contextmanager
def _writing(target: Path) -> Iterator[Path]:
    """A staged checkpoint directory; a failed write (disk full ...) is one line and leaves the others intact."""
    from bbadapt.platform.atomic import staged_directory

    try:
        with staged_directory(target, force=True, what="checkpoint") as stage:
            yield stage
    except OSError as exc:
        raise OutputError(f"cannot write checkpoint {target}: {exc.strerror or exc}; "
                          "the checkpoints written before are intact") from None
    except OutputError as exc:  # bbadapt.platform.atomic already made a full disk one line
        raise OutputError(f"{exc}; the checkpoints written before are intact") from None


def write_checkpoint(target: Path, net, trainer, manifest: BundleManifest, section: CheckpointSection) -> None:
    """One checkpoint directory (the bundle's manifest with ``section`` + parameters + optimizer state), atomically."""
    with _writing(target) as stage:
        save_detector_params(net, stage / manifest.detector.params_file)
        trainer.save_states(str(stage / STATES))
        store_manifest(stage, manifest.replace(checkpoint=section))


def read_checkpoint(directory: Path) -> BundleManifest:
    """The manifest of a training checkpoint (its ``checkpoint`` section validated with it), read once."""
    manifest = detector_manifest(directory)
    if manifest.checkpoint is None:
        raise OutputError(f"{directory} is not a bbadapt training checkpoint (no checkpoint section)")
    for name in (manifest.detector.params_file, STATES):
        if not manifest.path_of(name).is_file():
            raise OutputError(f"checkpoint {directory} lacks {name}")
    return manifest


# ----------------------------------------------------------------------------- schedule


# ----------------------------------------------------------------------------- the run


def train(bundle_dir: str | os.PathLike, dataset: str, config: Optional[TrainConfig] = None, *,
          gpus: Optional[str] = None, ctx: Optional[list] = None, resume: bool = False, horovod: bool = False,
          progress: Optional[Callable[[dict], None]] = None) -> dict:
    """Train the detector bundle at ``bundle_dir`` on ``dataset`` (``voc:DIR`` or ``coco:ANN.json[:IMAGES]``).

    ``config``: a :class:`TrainConfig` (its ``dataset`` is set from ``dataset``). VOC data
    trains on ``config.train_split`` and validates on ``config.val_split`` (of
    ``config.val_dataset`` if given, else of ``dataset``); COCO data validates on
    ``val_dataset`` (default: the training file itself). Devices: ``gpus="0,1"`` as on the
    command line (default: the CPU), or ``ctx``, a list of mxnet contexts, instead.
    ``resume`` continues from ``checkpoints/last`` (epoch, optimizer state, lr schedule
    position); without it, existing checkpoints are refused, never overwritten.
    ``progress`` receives every iteration/validation record.
    Returns a summary dict (epochs and iterations done, last losses, best mAP, checkpoints).
    """

    from bbadapt.platform.devices import contexts

    config = copy.copy(config or TrainConfig())  # validated when made (lr_steps sorted): trusted, not checked again
    config.dataset = str(dataset)  # filled in here, like devices below
    if ctx is not None and gpus is not None:
        raise OptionError("give the devices once: gpus=... or ctx=[...]")
    bundle_dir = Path(bundle_dir)
    manifest = detector_manifest(bundle_dir)
    if bundle_dir.resolve().parent.name == CHECKPOINTS and manifest.is_checkpoint:
        raise OutputError(f"{bundle_dir} is a training checkpoint; continue its run with "
                          f"`bbadapt train {bundle_dir.resolve().parent.parent} --resume`")
    manifest = manifest.replace(checkpoint=None)  # a checkpoint as a start point: a new run on its detector
    ctx = list(ctx) if ctx is not None else contexts(gpus)
    workers = Workers.horovod() if horovod else Workers()
    ctx = workers.contexts(ctx)
    config.devices = [str(c) for c in ctx]
    if config.amp and any(c.device_type != "gpu" for c in ctx):
        raise DeviceError("--amp (mixed precision) needs GPUs; MXNet 1.9.1's CPU AMP (bfloat16) "
                          "fails at the first convolution without AVX-512 (see docs/gpu.md)")
    config = resolve_batch_size(config, len(ctx), workers.size)  # unset: one image per device per worker
    per_worker = workers.per_worker_batch(config.batch_size, len(ctx))
    start = _start_state(bundle_dir, resume)  # every worker: all must stop, or none
    run = start.checkpoint if start is not None else None
    config, chosen = resolve_schedule(config, manifest.random_weights, run.config if run else None)
    if run is not None:
        _same_run(config, run.config)
    data, val = _datasets(manifest, config)
    if config.amp:
        from mxnet.contrib import amp as mx_amp

        mx_amp.init()
    net = _load_net(manifest if start is None else start, ctx, per_worker // len(ctx))
    check_proposals(net, config.short_side)
    with workers.failures():
        trainer = _trainer(net, config, ctx, workers)
        if start is not None:
            trainer.load_states(str(start.path_of(STATES)))
        log = _Log(bundle_dir / LOG, progress) if workers.root else _Log(None, None)  # rank 0 alone logs
        log({"event": "start", "epoch": (run.epoch if run else 0) + 1, "epochs": config.epochs,
             "images": len(data), "lr": config.lr, "warmup_iters": config.warmup_iters, "defaults": chosen})
        return _Run(net, trainer, ctx, config, manifest, bundle_dir, log, workers, data, val, run).fit()


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


def _start_state(bundle_dir: Path, resume: bool) -> Optional[BundleManifest]:
    """The checkpoint ``--resume`` continues (read once), or None for a new run (the rule both engines share)."""
    last = resume_point(bundle_dir, resume)
    return None if last is None else read_checkpoint(last)


def _datasets(manifest: BundleManifest, config: TrainConfig):
    from bbadapt.engines.gluon.datasets import open_dataset, parse_dataset

    classes = manifest.classes
    spec = parse_dataset(config.dataset)
    data = open_dataset(spec, classes, config.train_split, drop_empty=True)
    val_spec = parse_dataset(config.val_dataset) if config.val_dataset else spec
    val = open_dataset(val_spec, classes, config.val_split)
    return data, val


def _load_net(manifest: BundleManifest, ctx: list, per_device: int):
    net = load_quietly(manifest, ctx)
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


class Diverged(BbadaptError):
    """Training produced exploding or non-finite values; stopped before they reached the weights or a checkpoint."""


class _Run:
    """One training run: epochs of steps, validation, checkpoints."""

    def __init__(self, net, trainer, ctx, config, manifest, bundle_dir, log, workers, data, val,
                 start: Optional[CheckpointSection]):
        self.net, self.trainer, self.ctx, self.config = net, trainer, ctx, config
        self.manifest, self.dir, self.log, self.workers = manifest, bundle_dir, log, workers
        self.data, self.val = data, val
        self.rank0 = workers.root
        self.per_worker = config.batch_size // workers.size
        self.epoch = start.epoch if start else 0  # epochs completed
        self.iteration = start.iteration if start else 0
        self.best = start.best_map if start else None
        self.saved_epoch = self.epoch if start else None  # the newest checkpoint on disk
        self.checkpoints: list[str] = []
        self.last_losses: dict = {}
        self.start_norm = _weight_norm(trainer)

    def fit(self) -> dict:
        from gluoncv.data.batchify import FasterRCNNTrainBatchify
        from gluoncv.model_zoo.rcnn.faster_rcnn.data_parallel import ForwardBackwardTask
        from mxnet import gluon

        losses = (gluon.loss.SigmoidBinaryCrossEntropyLoss(from_sigmoid=False), gluon.loss.HuberLoss(rho=1 / 9),
                  gluon.loss.SoftmaxCrossEntropyLoss(), gluon.loss.HuberLoss(rho=1.0))  # gluoncv's script defaults
        task = ForwardBackwardTask(self.net, self.trainer, *losses, mix_ratio=1.0, amp_enabled=self.config.amp)
        batchify = FasterRCNNTrainBatchify(self.net, len(self.ctx))
        start_epoch = self.epoch
        for epoch in range(start_epoch, self.config.epochs):  # 0-based here: the schedule and the seeds
            loader = self._loader(batchify, epoch)  # before seeding: it moves the sampler on
            self._seed(epoch)
            self._epoch(epoch, loader, task)
            self.epoch = epoch + 1
            with self.workers.root_work(self.epoch):  # a failure here reaches every worker as one line
                val_map = self._validate() if self.epoch % self.config.val_interval == 0 else None
                if self.rank0:
                    self._save(val_map)
        digests = self.workers.finish(self.net)  # no worker returns before all are done (see distributed.py)
        self.log({"event": "finish", "epoch": self.epoch, "iteration": self.iteration, "workers": self.workers.size,
                  "param_digests": digests})
        return {"epochs": self.epoch, "iterations": self.iteration, "started_at_epoch": start_epoch,
                "losses": self.last_losses, "best_map": self.best, "checkpoints": self.checkpoints,
                "lr": self.config.lr, "warmup_iters": self.config.warmup_iters, "log": str(self.dir / LOG),
                "rank": self.workers.rank, "workers": self.workers.size, "param_digests": digests}

    def _seed(self, epoch: int) -> None:
        """Seed python, numpy and mxnet per epoch: a resumed epoch draws what an uninterrupted one would."""
        from gluoncv.utils import random as grandom

        grandom.seed(self.config.seed * 1000 + epoch)

    def _loader(self, batchify, epoch: int):
        import mxnet as mx

        from bbadapt.engines.gluon.datasets import spec_transforms

        sampler = epoch_sampler(self.data.get_im_aspect_ratio(), self.per_worker, self.workers, self.config.seed, epoch)
        transform = spec_transforms(self.manifest.target_spec(), self.config.short_side,
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
            step_losses = {name: sum(float(r[k].asscalar()) for r in results) / len(results)
                           for k, name in enumerate(LOSSES)}
            where = {"epoch": epoch + 1, "epochs": self.config.epochs, "batch": batch_index, "batches": steps}
            self._check_losses(where, step_losses)  # before the step: an exploded gradient never reaches the weights
            self.trainer.step(self.per_worker)  # horovod's trainer divides by the workers too: the global mean
            self._check_weights(where)  # after it: the next forward never feeds NaN to the proposal/ROI ops
            self.iteration += 1
            seen += self.config.batch_size  # all workers' images: samples/s is the job's throughput
            for name in LOSSES:
                window[name] += step_losses[name]
                totals[name] += step_losses[name]
            n_window = (batch_index % self.config.log_interval) + 1
            record = {"event": "iter", **where, "iteration": self.iteration, "lr": self.trainer.learning_rate,
                      **{k: v / n_window for k, v in window.items()}}
            record["loss"] = sum(record[k] for k in LOSSES)
            record["samples_per_s"] = seen / max(time.time() - tic, 1e-9)
            logged = n_window == self.config.log_interval or batch_index == steps - 1
            self.log(record, write=logged and self.rank0)
            if logged:
                self.last_losses = {k: record[k] for k in (*LOSSES, "loss")}
                window = {k: 0.0 for k in LOSSES}
        means = {k: v / max(steps, 1) for k, v in totals.items()}
        self.log({"event": "epoch", "epoch": epoch + 1, "epochs": self.config.epochs, "iteration": self.iteration,
                  "batches": steps,
                  "lr": self.trainer.learning_rate, **means,
                  "loss": sum(means.values()), "samples_per_s": seen / max(time.time() - tic, 1e-9),
                  "seconds": time.time() - tic, "workers": self.workers.size})

    def _shards(self, batch):
        """Batchify already split the batch per device: move each shard to its device."""
        per_device = [elem if isinstance(elem, (list, tuple)) else [elem] for elem in batch]  # 1 device: plain arrays
        return [[part.as_in_context(c) for part in shard] for shard, c in
                zip(zip(*per_device, strict=True), self.ctx, strict=True)]

    def _check_losses(self, where: dict, losses: dict) -> None:
        total = sum(losses.values())
        if math.isfinite(total) and total <= LOSS_LIMIT:
            return
        parts = ", ".join(f"{k} {v:.3g}" for k, v in losses.items())
        seen = "is not finite" if not math.isfinite(total) else f"exceeds {LOSS_LIMIT:g}"
        self._diverged(where, f"loss {total:.3g} ({parts}) {seen}")

    def _check_weights(self, where: dict) -> None:
        norm = _weight_norm(self.trainer)
        if math.isfinite(norm) and norm <= WEIGHT_GROWTH_LIMIT * max(self.start_norm, 1e-12):
            return
        self._diverged(where, f"the trainable weights' norm went from {self.start_norm:.3g} to {norm:.3g}")

    def _diverged(self, where: dict, what: str) -> None:
        if self.saved_epoch is None:
            kept = "no checkpoint was written"
        else:
            kept = f"{self.dir / CHECKPOINTS / epoch_name(self.saved_epoch)} and the checkpoints before it are intact"
        raise Diverged(f"training diverged at epoch {where['epoch']}/{where['epochs']}, batch {where['batch'] + 1}/"
                       f"{where['batches']}: {what}; lr was {self.trainer.learning_rate:.3g} (--lr {self.config.lr:g}, "
                       f"--warmup {self.config.warmup_iters}): lower --lr (e.g. --lr {self.config.lr / 10:g}) or raise "
                       f"--warmup; {kept}")

    def _validate(self) -> Optional[float]:
        """VOC07 mAP on the validation set (rank 0; the other workers skip it, as gluoncv's script)."""
        if not self.rank0:
            return None
        from bbadapt.engines.gluon.evaluate import predictions, score

        if self.config.hybridize:
            self.net.hybridize(static_alloc=True)  # the inference graph differs from the training one
        preds = predictions(self.net, self.val, self.ctx[0], self.manifest.target_spec(),
                            self.config.short_side, self.config.max_size)
        result = score(self.val, preds, "voc07")
        self.log({"event": "val", "epoch": self.epoch, "epochs": self.config.epochs, "iteration": self.iteration,
                  "metric": "voc07", "map": result["map"], "per_class": result["per_class"]})
        return result["map"]

    def _save(self, val_map: Optional[float]) -> None:
        """``epoch-NNNN``, then ``last`` (and ``best`` when improved) pointed at it; epochs that
        ``--checkpoint-every`` does not keep are removed once nothing points at them."""
        root = self.dir / CHECKPOINTS
        improved = val_map is not None and (self.best is None or val_map > self.best)
        if improved:
            self.best = val_map
        section = CheckpointSection(epoch=self.epoch, iteration=self.iteration, val_map=val_map, best_map=self.best,
                                    val_metric="voc07", dataset=self.config.dataset,
                                    config=json.loads(json.dumps(_config_dict(self.config))))
        written = root / epoch_name(self.epoch)
        write_checkpoint(written, self.net, self.trainer, self.manifest, section)
        self.saved_epoch = self.epoch
        point_reference(root, LAST, written)
        if improved:
            point_reference(root, BEST, written)
        self._prune(root)
        self.checkpoints = sorted(str(p) for p in root.glob(f"{EPOCH_PREFIX}*"))
        self.log({"event": "checkpoint", "epoch": self.epoch, "iteration": self.iteration, "path": str(written),
                  "val_map": val_map, "best": improved})

    def _kept(self, epoch: int) -> bool:
        return epoch % self.config.checkpoint_every == 0 or epoch == self.config.epochs

    def _prune(self, root: Path) -> None:
        prune(root, self._kept)  # the layout both engines share


def _weight_norm(trainer) -> float:
    """Global L2 norm of the parameters the trainer updates (first device's copy; all copies agree)."""
    total = 0.0
    for p in trainer._params:
        value = float((p.list_data()[0].astype("float32").norm() ** 2).asscalar())
        total += value
    return math.sqrt(total) if math.isfinite(total) else float("inf")


def _config_dict(config: TrainConfig) -> dict:
    d = asdict(config)
    d["lr_steps"] = list(config.lr_steps)
    return d
