"""Training across processes with Horovod, the way gluoncv's ``train_faster_rcnn.py --horovod`` does it.

One :class:`Workers` object says who this process is (rank, number of workers, local rank)
and owns every Horovod call, so the training loop reads the same with and without Horovod:

* rank 0's parameters are broadcast to all workers before the first step;
* gradients are summed by Horovod's allreduce inside ``hvd.DistributedTrainer`` and divided
  by workers x per-worker batch, i.e. averaged over the global batch;
* every worker reads its own part of the training images each epoch (gluoncv's
  ``SplitSortedBucketSampler`` with ``num_parts``/``part_index``; the split is reshuffled every
  epoch, as with gluoncv's sampler object that lives for the whole run);
* only rank 0 logs, validates and writes checkpoints;
* ``--batch-size`` is the *global* batch (images per step over all workers and devices), as in
  gluoncv's script, which gives each worker ``batch_size // workers``.

The end of a run is where Horovod jobs die: MXNet's engine is asynchronous, so a worker
whose Python code has returned may still have its last allreduce queued; if that process
exits, Horovod shuts down under the others ("Horovod has been shut down ... after one of
the ranks finished execution"). :meth:`Workers.finish` drains the engine and then meets
every other worker in one collective (which also compares the workers' final parameters),
so no worker leaves before all have finished their last step and rank 0 its last checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

from bbadapt.platform.errors import BbadaptError, DeviceError, OptionError


class WorkersDisagree(BbadaptError):
    """The workers ended a run with different parameters (a broken allreduce or broadcast)."""


class WorkerLost(BbadaptError):
    """Another worker of the Horovod job failed or was killed, so this one cannot go on."""


SHUT_DOWN = "Horovod has been shut down"  # how MXNet reports a collective that lost its peers


@dataclass(frozen=True)
class Workers:
    """This process among the training processes; one process alone is rank 0 of 1."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    hvd: Any = None  # the horovod.mxnet module, or None without --horovod

    @classmethod
    def horovod(cls) -> Workers:
        """Join the Horovod job this process was started in (by ``horovodrun``)."""
        hvd = import_horovod()
        hvd.init()
        stop_on_sigterm()
        return cls(rank=hvd.rank(), size=hvd.size(), local_rank=hvd.local_rank(), hvd=hvd)

    @property
    def root(self) -> bool:
        """Rank 0: the one worker that logs, validates and writes checkpoints."""
        return self.rank == 0

    def contexts(self, ctx: Optional[list]) -> list:
        """Under Horovod a worker drives one device: the GPU of its local rank, or the CPU."""
        import mxnet as mx

        if self.hvd is None:
            return list(ctx or [mx.cpu()])
        wants_gpu = bool(ctx) and ctx[0].device_type == "gpu"
        return [mx.gpu(self.local_rank)] if wants_gpu else [mx.cpu()]

    def per_worker_batch(self, batch_size: int, devices: int) -> int:
        """Images one worker takes per step out of the global ``batch_size``."""
        if batch_size % (self.size * devices) == 0:
            return batch_size // self.size
        if self.hvd is None:
            raise OptionError(f"--batch-size {batch_size} must be a multiple of the {devices} devices")
        raise OptionError(f"--batch-size {batch_size} (the global batch, over all workers) must be a multiple of "
                          f"the {self.size} workers x {devices} device(s)")

    def trainer(self, params: dict, optimizer: str, options: dict, kvstore: Optional[str] = None,
                update_on_kvstore: Optional[bool] = None):
        """rank 0's parameters to everyone, then ``hvd.DistributedTrainer`` (or a plain gluon Trainer).

        ``params`` is the name -> Parameter dict of the trainable ones; the broadcast covers
        them all, frozen constants included, as gluoncv's script broadcasts ``collect_params()``.
        """
        import mxnet as mx

        if self.hvd is None:
            return mx.gluon.Trainer(params, optimizer, options, kvstore=kvstore, update_on_kvstore=update_on_kvstore)
        return self.hvd.DistributedTrainer(params, optimizer, options)

    def broadcast(self, params) -> None:
        """rank 0's values into every worker's parameters (a no-op alone)."""
        if self.hvd is not None:
            self.hvd.broadcast_parameters(params, root_rank=0)

    @contextlib.contextmanager
    def failures(self) -> Iterator[None]:
        """A peer's failure reaches this worker as MXNet's "Horovod has been shut down" error on
        its next collective; turn it into one line that says what happened."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is the shutdown
            if self.hvd is None or SHUT_DOWN not in str(exc):
                raise
            _drain_engine()
            raise WorkerLost(f"worker {self.rank}: another worker of this Horovod job failed or was killed (see its "
                             "error); this one stops too. The checkpoints written so far are intact "
                             "(continue with --resume)") from None

    @contextlib.contextmanager
    def root_work(self, epoch: int) -> Iterator[None]:
        """Rank 0's end-of-epoch work (validation, checkpoint), then every worker learns how it went.

        Without this, a rank 0 that fails there (a full disk, a file in the way) exits while the
        others wait in the next epoch's asynchronous allreduce; Horovod's shutdown then reaches
        them inside MXNet's engine, which was seen to crash a worker with a segfault instead of
        raising. Here every worker meets in one synchronous allgather after that work, with no
        operation queued, and a worker whose peer failed stops with one line naming it.
        """
        failure: Optional[Exception] = None
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - told to the others, then re-raised
            failure = exc
        if self.hvd is not None:
            said = self.meet(None if failure is None else str(failure), f"bbadapt.epoch{epoch}")
            failed = [(rank, text) for rank, text in enumerate(said) if text is not None and rank != self.rank]
            if failure is None and failed:
                rank, text = failed[0]
                raise WorkerLost(f"worker {self.rank}: another worker of this Horovod job failed at the end of epoch "
                                 f"{epoch} (worker {rank}: {text})")
        if failure is not None:
            raise failure

    def meet(self, value, name: str) -> list:
        """Every worker's ``value`` (rank order), exchanged in one synchronous allgather.

        MXNet's engine is drained before (no allreduce of this worker is still queued to
        interleave with the allgather) and after (the allgather's own work is done when this
        returns). Horovod jobs only: the caller checks ``self.hvd``.
        """
        import mxnet as mx

        mx.nd.waitall()
        said = self.hvd.allgather_object(value, name=name)
        mx.nd.waitall()
        return said

    def finish(self, net) -> list[str]:
        """Drain MXNet's engine, then meet every worker; returns each worker's parameter digest.

        Raises :class:`WorkersDisagree` on every worker if their parameters differ.
        """
        import mxnet as mx

        mx.nd.waitall()  # this worker's queued allreduces and updates are done
        mine = parameter_digest(net)
        if self.hvd is None:
            return [mine]
        digests = self.meet(mine, "bbadapt.finish")  # every worker gets here, or none returns
        if len(set(digests)) != 1:
            raise WorkersDisagree("the workers ended with different parameters (digests "
                                  + ", ".join(f"rank {r}: {d[:12]}" for r, d in enumerate(digests)) + ")")
        return digests


def _drain_engine() -> None:
    """Collect the failed operations still queued in MXNet's engine, which would otherwise be
    raised again (as a traceback) by MXNet's exit hook."""
    import mxnet as mx

    with contextlib.suppress(Exception):
        mx.nd.waitall()


def import_horovod():
    """``horovod.mxnet``, or one line saying how to get it."""
    try:
        import horovod.mxnet as hvd
    except ImportError:
        raise DeviceError("--horovod needs horovod built with MXNet support: "
                          "HOROVOD_WITH_MXNET=1 pip install horovod (see docs/training.md)") from None
    return hvd


def stop_on_sigterm() -> None:
    """``horovodrun`` ends the other workers of a failed job with SIGTERM (SIGKILL 5 s later).

    Python's default action for SIGTERM kills the process on the spot; as an exception it
    unwinds, so a checkpoint being written is removed from its staging directory instead
    of left half-written beside the good ones.
    """

    def _raise(signum, frame):  # noqa: ARG001 - signal handler signature
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)


def parameter_digest(net) -> str:
    """SHA-256 over every parameter of ``net`` (structural name, dtype, shape, bytes), sorted by name.

    Equal digests mean bitwise-equal parameters; the R-CNN target generator gluoncv creates
    on the first step holds constants only and is left out, as in checkpoints.
    """
    sha = hashlib.sha256()
    for name, param in sorted(net._collect_params_with_prefix().items()):
        if name.startswith("_target_generator.") or param._data is None:
            continue
        value = param.data(param.list_ctx()[0]).asnumpy()
        sha.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        sha.update(value.tobytes())
    return sha.hexdigest()


def epoch_sampler(aspect_ratios, per_worker_batch: int, workers: Workers, seed: int, epoch: int):
    """gluoncv's ``SplitSortedBucketSampler`` for ``epoch``: this worker's part of the images.

    gluoncv's script keeps one sampler for the whole run, and with several parts the sampler
    reshuffles which images go to which worker at every pass. bbadapt builds the loader per
    epoch (so ``--resume`` can start at any epoch), so the sampler is moved on by ``epoch``
    passes of its index permutation: epoch e gets the split an uninterrupted gluoncv run
    would give it, and every worker, computing the same permutations, a disjoint part.
    Call this before seeding the epoch: the passes draw from the global random state.
    """
    from gluoncv.data.sampler import SplitSortedBucketSampler

    sampler = SplitSortedBucketSampler(aspect_ratios, per_worker_batch, num_parts=workers.size,
                                       part_index=workers.rank, shuffle=True, seed=seed)
    if workers.size > 1:
        for _ in range(epoch):
            for _ in sampler:  # one pass re-permutes the split (nothing else in it is kept)
                break
    return sampler
