"""``bbadapt train EXPORT``: train a torchvision export (what ``bbadapt export DIR --torchvision OUT`` writes).

The same options and behaviour as the MXNet engine (:mod:`bbadapt.engines.gluon.train`), from the
same :class:`~bbadapt.engines.gluon.options.TrainConfig`, data readers, schedule, checkpoint
layout and log: SGD (momentum, weight decay) over the parameters the export leaves trainable
(``config.json`` ``backbone.trainable_layers`` = 5 - ``--freeze-at``; every backbone BN is a
``FrozenBatchNorm2d``, fused convs have none), the lr per image of the detection recipes
(:mod:`bbadapt.engines.common.schedule`), linear warmup, lr steps, the divergence guard,
``best``/``last`` checkpoints written atomically, ``--resume``.

Several processes: run the same command under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
in the environment): gloo on the CPU, NCCL on GPUs, ``DistributedDataParallel``, a
``DistributedSampler``; ``--batch-size`` stays the global batch. Rank 0 alone validates, logs
and writes checkpoints; every collective has a timeout, and torchrun ends the job when a rank
dies. ``--amp``: ``torch.autocast`` (bfloat16 on the CPU; float16 with a ``GradScaler`` on GPUs).

Each checkpoint ``checkpoints/epoch-NNNN`` is itself a complete export (``config.json`` with a
``checkpoint`` section, the runtime, ``model.safetensors``) plus ``trainer.pt``: evaluate it,
export it onward, or load it with ``frcnn_runtime.load``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from bbadapt.bundle.schema import (
    BEST,
    CHECKPOINTS,
    EXPORT_CONFIG,
    EXPORT_WEIGHTS,
    LAST,
    TRAIN_LOG,
    CheckpointSection,
    TorchvisionExport,
    epoch_name,
)
from bbadapt.engines.common import checkpoints as ckpt
from bbadapt.engines.common.datasets import open_dataset, parse_dataset
from bbadapt.engines.common.metrics import default_metric, score
from bbadapt.engines.common.progress import Log
from bbadapt.engines.common.schedule import (
    LOSS_LIMIT,
    LOSSES,
    WEIGHT_GROWTH_LIMIT,
    learning_rate,
    resolve_batch_size,
    resolve_schedule,
)
from bbadapt.engines.torch import export as tv
from bbadapt.engines.torch.data import DetectionSet, collate
from bbadapt.engines.torch.devices import pick_device
from bbadapt.platform.errors import BbadaptError, OptionError, OutputError

# torchvision's loss names -> the four both engines log
TORCHVISION_LOSSES = {"loss_objectness": "rpn_cls", "loss_rpn_box_reg": "rpn_box", "loss_classifier": "rcnn_cls",
                      "loss_box_reg": "rcnn_box"}
RESUME_MUST_MATCH = ("lr", "momentum", "wd", "lr_steps", "lr_decay", "warmup_iters", "warmup_factor", "batch_size",
                     "short_side", "max_size", "flip_p", "seed", "dataset", "val_dataset", "train_split", "val_split", "amp")
COLLECTIVE_TIMEOUT_S = float(os.environ.get("BBADAPT_DIST_TIMEOUT", "1800"))  # a collective waiting longer: a rank is gone


class Diverged(BbadaptError):
    exit_code = 1


class Ranks:
    """This process's place in a torchrun job (one process: rank 0 of 1)."""

    def __init__(self, device: torch.device) -> None:
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = device
        self.active = self.size > 1

    def start(self) -> None:
        if not self.active:
            return
        import torch.distributed as dist

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))

    def mean(self, values: list[float]) -> list[float]:
        """The mean of ``values`` over all ranks (the values themselves in one process)."""
        if not self.active:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.size).tolist()

    def agree(self, ok: bool, message: str) -> None:
        """Every rank learns whether rank 0's end-of-epoch work succeeded; the others stop with one line if not."""
        if not self.active:
            return
        import torch.distributed as dist

        t = torch.tensor([0.0 if ok else 1.0], device=self.device)
        dist.broadcast(t, 0)
        if t.item() and self.rank != 0:
            raise OutputError(message)

    def stop(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def config_dict(config) -> dict:
    d = asdict(config)
    d["lr_steps"] = list(config.lr_steps)
    return json.loads(json.dumps(d))


def _same_run(config, stored: dict) -> None:
    given = config_dict(config)
    differ = [f"{key} {given.get(key)!r} (the run used {stored[key]!r})" for key in RESUME_MUST_MATCH
              if key in stored and given.get(key) != stored[key]]
    if differ:
        raise OptionError("--resume continues the checkpointed run, but these settings differ from it: "
                          + "; ".join(differ) + " (pass the run's values; only --epochs may grow)")


def _random_weights(export: TorchvisionExport) -> bool:
    weights = export.section("provenance").get("weights") or {}
    return isinstance(weights, dict) and weights.get("kind") == "random"


def _seed(config, epoch: int, rank: int) -> None:
    seed = (config.seed * 100003 + epoch * 1009 + rank) % 2**32
    torch.manual_seed(seed)
    np.random.seed(seed)


def train(directory: str | os.PathLike, dataset: str, config, *, gpus: Optional[str] = None, resume: bool = False,
          progress: Optional[Callable[[dict], None]] = None) -> dict:
    """Train the export at ``directory`` on ``dataset``; returns what the CLI reports (see the module docstring)."""
    from dataclasses import replace

    directory = Path(directory)
    export = tv.read_export(directory)  # one line for anything that is not an export, before any data is read
    device = pick_device(gpus)
    ranks = Ranks(device)
    config = resolve_batch_size(config, 1, ranks.size)  # unset: one image per process (one device each)
    if config.batch_size % ranks.size:
        raise OptionError(f"--batch-size {config.batch_size} (the global batch) must be a multiple of the "
                          f"{ranks.size} torchrun processes")
    config = replace(config, dataset=str(dataset), devices=[str(device)])
    parse_dataset(config.dataset)
    last = ckpt.resume_point(directory, resume)
    start = None
    if last is not None:
        start_export = tv.read_export(last)
        start = tv.checkpoint_of(start_export, last)
        if start is None or not (last / tv.TRAINER_STATE).is_file():
            raise OutputError(f"{last} is not a complete torch training checkpoint")
    config, notes = resolve_schedule(config, _random_weights(export), start.config if start else None)
    if start is not None:
        _same_run(config, start.config)
    classes = export.classes
    data = open_dataset(config.dataset, classes, config.train_split, drop_empty=True)
    val_spec = config.val_dataset or config.dataset
    val = open_dataset(val_spec, classes, config.val_split)
    ranks.start()
    try:
        return _Run(directory, export, config, ranks, data, val, last, start, progress, notes).fit()
    except RuntimeError as exc:
        if ranks.size > 1 and peer_lost(exc):
            # Another rank died and this one's collective failed before torchrun's SIGTERM arrived: the same
            # stop as that SIGTERM (the CLI names the other process), not an internal error. The SIGTERM that
            # follows must not interrupt this process's last line.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            TERMINATED.append("peer")
            raise KeyboardInterrupt from exc
        raise
    finally:
        ranks.stop()


def peer_lost(exc: RuntimeError) -> bool:
    """Whether a collective failed because another process of the job is gone (gloo's and NCCL's words)."""
    import torch.distributed as dist

    text = str(exc)
    return (isinstance(exc, getattr(dist, "DistBackendError", ())) or "closed by peer" in text
            or "reset by peer" in text or "gloo/transport" in text or "NCCL" in text)


class _Run:
    def __init__(self, directory: Path, export: TorchvisionExport, config, ranks: Ranks, data, val, last, start,
                 progress, notes: str) -> None:
        self.dir, self.export, self.config, self.ranks = directory, export, config, ranks
        self.rank0 = ranks.rank == 0
        self.device = ranks.device
        self.model, _ = tv.load_model(last or directory, self.device)
        self.model.transform.min_size = (config.short_side,)
        self.model.transform.max_size = config.max_size
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=config.lr, momentum=config.momentum, weight_decay=config.wd)
        self.amp_dtype = None
        self.scaler = None
        if config.amp:
            self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
            if self.device.type == "cuda":
                self.scaler = torch.amp.GradScaler("cuda")
        self.epoch, self.iteration, self.best, self.saved_epoch = 0, 0, None, None
        if start is not None:
            state = torch.load(last / tv.TRAINER_STATE, map_location=self.device, weights_only=True)
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.epoch, self.iteration, self.best = start.epoch, start.iteration, start.best_map
            self.saved_epoch = start.epoch
        self.net = self.model
        if ranks.active:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                               else None)
        self.data = DetectionSet(data, export.section("input").get("range", "01"), flip_p=config.flip_p, seed=config.seed)
        self.val = val
        self.per_rank = config.batch_size // ranks.size
        self.log = Log(directory / TRAIN_LOG if self.rank0 else None, progress if self.rank0 else None)
        self.notes = notes
        self.start_epoch = self.epoch
        self.start_norm = self._weight_norm()

    def _weight_norm(self) -> float:
        with torch.no_grad():
            total = sum(float(p.detach().double().pow(2).sum()) for p in self.params)
        return math.sqrt(total) if math.isfinite(total) else float("inf")

    def fit(self) -> dict:
        from torch.utils.data import DataLoader
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(self.data, num_replicas=self.ranks.size, rank=self.ranks.rank, shuffle=True,
                                     seed=self.config.seed)
        loader = DataLoader(self.data, batch_size=self.per_rank, sampler=sampler, collate_fn=collate,
                            num_workers=self.config.num_workers)
        self.log({"event": "start", "epoch": self.epoch + 1, "epochs": self.config.epochs, "images": len(self.data),
                  "lr": self.config.lr, "warmup_iters": self.config.warmup_iters, "defaults": self.notes,
                  "engine": "torch", "workers": self.ranks.size, "amp": str(self.amp_dtype).replace("torch.", "")
                  if self.amp_dtype else None})
        while self.epoch < self.config.epochs:
            sampler.set_epoch(self.epoch)
            self.data.set_epoch(self.epoch)
            _seed(self.config, self.epoch, self.ranks.rank)
            self._epoch(loader)
            self.epoch += 1
            self._end_of_epoch()
        digests = self._digests()
        self.log({"event": "finish", "epoch": self.epoch, "iteration": self.iteration, "workers": self.ranks.size,
                  "param_digests": digests})
        return {"rank": self.ranks.rank, "started_at_epoch": self.start_epoch, "epochs": self.config.epochs,
                "iterations": self.iteration, "lr": self.config.lr, "warmup_iters": self.config.warmup_iters,
                "best_map": self.best, "engine": "torch", "workers": self.ranks.size}

    def _digests(self) -> list[str]:
        import hashlib

        h = hashlib.sha256()
        for p in self.params:
            h.update(p.detach().cpu().numpy().tobytes())
        digests = [h.hexdigest()]
        if self.ranks.active:  # every rank must end with the same parameters
            import torch.distributed as dist

            digests = [None] * self.ranks.size
            dist.all_gather_object(digests, h.hexdigest())
            if len(set(digests)) > 1:
                raise OutputError(f"the {self.ranks.size} torchrun processes ended with different parameters "
                                  f"({', '.join(d[:12] for d in digests)})")
        return digests

    def _epoch(self, loader) -> None:
        self.net.train()
        batches = len(loader)
        sums = dict.fromkeys(LOSSES, 0.0)
        window = dict.fromkeys(LOSSES, 0.0)
        in_window, seen, tic = 0, 0, time.time()
        for batch, (images, targets) in enumerate(loader):
            lr = learning_rate(self.config, self.epoch, batch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            images = [im.to(self.device, non_blocking=True) for im in images]
            targets = [{k: v.to(self.device) for k, v in t.items()} for t in targets]
            where = {"epoch": self.epoch + 1, "epochs": self.config.epochs, "batch": batch, "batches": batches}
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                parts = self.net(images, targets)
            total = sum(parts.values())
            values = self.ranks.mean([float(parts[k].detach()) for k in TORCHVISION_LOSSES])
            losses = dict(zip(LOSSES, values, strict=True))
            self._check_losses(where, losses, lr)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(total).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                total.backward()
                self.optimizer.step()
            self._check_weights(where, lr)
            self.iteration += 1
            seen += self.config.batch_size
            in_window += 1
            for k in LOSSES:
                sums[k] += losses[k]
                window[k] += losses[k]
            logged = (batch + 1) % self.config.log_interval == 0 or batch + 1 == batches
            record = {"event": "iter", **where, "iteration": self.iteration, "lr": lr,
                      **{k: window[k] / in_window for k in LOSSES}}
            record["loss"] = sum(record[k] for k in LOSSES)
            record["samples_per_s"] = seen / max(time.time() - tic, 1e-9)
            self.log(record, write=logged)
            if logged:
                window, in_window = dict.fromkeys(LOSSES, 0.0), 0
        means = {k: sums[k] / max(batches, 1) for k in LOSSES}
        self.log({"event": "epoch", "epoch": self.epoch + 1, "epochs": self.config.epochs, "batches": batches,
                  "lr": self.optimizer.param_groups[0]["lr"], **means, "loss": sum(means.values()),
                  "samples_per_s": seen / max(time.time() - tic, 1e-9), "seconds": time.time() - tic,
                  "workers": self.ranks.size})

    def _check_losses(self, where: dict, losses: dict, lr: float) -> None:
        total = sum(losses.values())
        if math.isfinite(total) and total <= LOSS_LIMIT:
            return
        parts = ", ".join(f"{k} {v:.3g}" for k, v in losses.items())
        seen = "is not finite" if not math.isfinite(total) else f"exceeds {LOSS_LIMIT:g}"
        self._diverged(where, f"loss {total:.3g} ({parts}) {seen}", lr)

    def _check_weights(self, where: dict, lr: float) -> None:
        norm = self._weight_norm()
        if math.isfinite(norm) and norm <= WEIGHT_GROWTH_LIMIT * max(self.start_norm, 1e-12):
            return
        self._diverged(where, f"the trainable weights' norm went from {self.start_norm:.3g} to {norm:.3g}", lr)

    def _diverged(self, where: dict, what: str, lr: float) -> None:
        if self.saved_epoch is None:
            kept = "no checkpoint was written"
        else:
            kept = f"{self.dir / CHECKPOINTS / epoch_name(self.saved_epoch)} and the checkpoints before it are intact"
        raise Diverged(f"training diverged at epoch {where['epoch']}/{where['epochs']}, batch {where['batch'] + 1}/"
                       f"{where['batches']}: {what}; lr was {lr:.3g} (--lr {self.config.lr:g}, --warmup "
                       f"{self.config.warmup_iters}): lower --lr (e.g. --lr {self.config.lr / 10:g}) or raise --warmup; {kept}")

    def _end_of_epoch(self) -> None:
        error = None
        if self.rank0:
            try:
                val_map = self._validate() if (self.epoch % self.config.val_interval == 0
                                               or self.epoch == self.config.epochs) else None
                self._save(val_map)
            except BbadaptError as exc:
                error = exc
        self.ranks.agree(error is None, f"another process of this torchrun job failed at the end of epoch {self.epoch} "
                                        f"(rank 0: {error})")
        if error is not None:
            raise error

    def _validate(self) -> Optional[float]:
        from bbadapt.engines.torch.evaluate import predictions

        metric = default_metric("auto", self.val)
        preds = predictions(self.model, self.val, self.export.section("input").get("range", "01"), self.device,
                            amp_dtype=self.amp_dtype)
        result = score(self.val, preds, metric)
        self.log({"event": "val", "epoch": self.epoch, "epochs": self.config.epochs, "iteration": self.iteration,
                  "metric": metric, "map": result["map"], "per_class": result["per_class"]})
        self.metric = metric
        return result["map"]

    def _save(self, val_map: Optional[float]) -> None:
        root = self.dir / CHECKPOINTS
        improved = val_map is not None and not math.isnan(val_map) and (self.best is None or val_map > self.best)
        if improved:
            self.best = val_map
        section = CheckpointSection(epoch=self.epoch, iteration=self.iteration, val_map=val_map, best_map=self.best,
                                    val_metric=getattr(self, "metric", None), dataset=self.config.dataset,
                                    config=config_dict(self.config), extra={"engine": "torch"})
        config = TorchvisionExport.from_dict({**self.export.to_dict(), tv.CHECKPOINT_SECTION: section.to_dict()})
        written = root / epoch_name(self.epoch)
        root.mkdir(parents=True, exist_ok=True)
        with ckpt.writing(written) as stage:
            metadata = {"format": "pt", "bbadapt.format": self.export.format, "bbadapt.layout": self.export.layout}
            (stage / EXPORT_WEIGHTS).write_bytes(tv.safetensors_bytes(self.model, metadata))
            (stage / EXPORT_CONFIG).write_text(config.to_json())
            shutil.copyfile(self.dir / self.export.runtime, stage / self.export.runtime)
            torch.save({"optimizer": self.optimizer.state_dict(),
                        "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                        "epoch": self.epoch, "iteration": self.iteration}, stage / tv.TRAINER_STATE)
        self.saved_epoch = self.epoch
        ckpt.point_reference(root, LAST, written)
        if improved:
            ckpt.point_reference(root, BEST, written)
        ckpt.prune(root, lambda e: e % self.config.checkpoint_every == 0 or e == self.config.epochs)
        self.log({"event": "checkpoint", "epoch": self.epoch, "iteration": self.iteration, "path": str(written),
                  "val_map": val_map, "best": improved})


TERMINATED = []  # set when the launcher sent SIGTERM: the CLI's line then names the other process


def install_sigterm() -> None:
    """SIGTERM (torchrun stopping the job after another rank died) unwinds like Ctrl-C, so a checkpoint
    being staged is removed and the ones already written stay intact."""
    def handler(signum, frame):
        TERMINATED.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
