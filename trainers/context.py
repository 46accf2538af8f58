"""Where the worker loop reports to: Ray Train, or a plain in-process list.

The loop only sees ``WorkerContext``; it never imports ``ray.tune``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any, Protocol

from trainers import metrics as M


class WorkerContext(Protocol):
    """What the training loop needs from the process it runs in."""

    rank: int
    world_size: int
    device: Any  # torch.device batches go to

    def prepare_model(self, model: Any) -> Any:
        """Wrap the model for data-parallel training (no-op for one worker)."""

    def restore_dir(self) -> contextlib.AbstractContextManager[str | None]:
        """A local folder holding the checkpoint to resume from, or ``None``."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        """Report metrics (every rank) and, from rank 0, a checkpoint folder."""

    def stepped(self, name: str, step: int, total: int) -> None:
        """Optimizer step ``step`` of ``total`` is done (progress between reports; most
        contexts have no one to tell)."""


def worker_node_ids(world_size: int) -> str:
    """The Ray node id of every rank, comma-separated in rank order (shows where a trial ran)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if world_size == 1:
        return node
    import torch.distributed as dist

    ids: list[str | None] = [None] * world_size
    dist.all_gather_object(ids, node)  # once per worker group, at start
    return ",".join(str(i) for i in ids)


class RayTrainContext:
    """Inside a Ray Train worker: ``ray.train.report`` / ``get_checkpoint``.

    ``resume_from`` (a checkpoint path or URI) seeds a new Train run: Train V2
    refuses ``resume_from_checkpoint``, so the driver passes it in the config.
    The run's own latest checkpoint (after a worker-group restart) wins.
    """

    def __init__(self, resume_from: str | None = None) -> None:
        import ray.train

        self.resume_from = resume_from
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        import ray.train.torch

        self.device = ray.train.torch.get_device()  # cuda:N on GPU workers, else cpu
        self.node_ids = worker_node_ids(self.world_size)

    def prepare_model(self, model: Any) -> Any:
        import ray.train.torch

        # Moves the model to this worker's device; wraps it in DDP when world_size > 1.
        return ray.train.torch.prepare_model(model)

    @contextlib.contextmanager
    def restore_dir(self) -> Iterator[str | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and self.resume_from:
            checkpoint = ray.train.Checkpoint(self.resume_from)
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as path:
            yield path

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report({**metrics, M.WORKER_NODES: self.node_ids}, checkpoint=checkpoint)

    def stepped(self, name: str, step: int, total: int) -> None:
        return None


class LocalContext:
    """A single plain process (tests, debugging): reports are kept in memory.

    Checkpoints are copied to ``checkpoint_root/checkpoint_<k>``.
    """

    rank = 0
    world_size = 1

    def __init__(
        self,
        checkpoint_root: str | None = None,
        resume_from: str | None = None,
        device: str | None = None,
    ) -> None:
        import torch

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.checkpoint_root = checkpoint_root or tempfile.mkdtemp(prefix="tunefleet-ckpt-")
        self.resume_from = resume_from
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: list[str] = []

    def prepare_model(self, model: Any) -> Any:
        return model.to(self.device)

    @contextlib.contextmanager
    def restore_dir(self) -> Iterator[str | None]:
        yield self.resume_from

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir:
            dest = os.path.join(self.checkpoint_root, f"checkpoint_{len(self.checkpoints):06d}")
            shutil.copytree(checkpoint_dir, dest)
            self.checkpoints.append(dest)

    def stepped(self, name: str, step: int, total: int) -> None:
        return None
