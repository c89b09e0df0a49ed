"""A tune's latest training checkpoint in the job's storage (`tunes/<id>/checkpoint.pt`), so
that a training attempt the lease sweep sends to another worker resumes there instead of
starting over. The training worker saves every periodic checkpoint here (replacing the last:
one object per tune), settle_training deletes it when training ends however it ends, and
the retention sweep deletes any left over when it deletes the tune's weights.

A failed PUT or GET is logged and training goes on (from the older stored checkpoint, or
from the start); a checkpoint over `CHECKPOINT_MAX_BYTES` raises CheckpointTooLarge (a valid
spec never makes one). One synchronous PUT per checkpoint (`checkpoint_every` = steps / 10) of
about three times the LoRA (weights plus AdamW's two moments, fp32): docs/benchmarks.md."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

from orchestrator.storage import Storage, StorageError

log = logging.getLogger(__name__)

# The largest checkpoint a valid spec makes is SDXL at rank 64 (the spec's maximum):
# 1.45 M LoRA parameters per rank x 64 x 3 tensors x 4 bytes = 1.1 GB.
CHECKPOINT_MAX_BYTES: Final = 1536 * 1024**2


class CheckpointTooLarge(StorageError):
    pass


def checkpoint_key(tune_id: str) -> str:
    return f"tunes/{tune_id}/checkpoint.pt"


class StoredCheckpoint:
    """The storage side of `models.lora_checkpoint.CheckpointStore` for one tune."""

    def __init__(
        self, storage: Storage, tune_id: str, *, max_bytes: int = CHECKPOINT_MAX_BYTES
    ) -> None:
        self.storage = storage
        self.key = checkpoint_key(tune_id)
        self.max_bytes = max_bytes

    def save(self, path: Path, step: int) -> None:
        size = path.stat().st_size
        if size > self.max_bytes:
            raise CheckpointTooLarge(
                f"the training checkpoint at step {step} is {size} bytes, over the"
                f" {self.max_bytes}-byte limit for checkpoints kept in storage"
            )
        try:
            self.storage.put(self.key, path.read_bytes())
        except Exception as exc:  # the copy is a saving, not a result: training goes on
            log.warning(
                "could not store the training checkpoint of step %d at %s (%s); the stored"
                " one, if any, stays the older one",
                step,
                self.key,
                exc,
            )
            return
        log.info("stored the training checkpoint of step %d (%d bytes) at %s", step, size, self.key)

    def fetch(self, dest: Path) -> Path | None:
        try:
            return self.storage.download_to(self.key, dest)
        except FileNotFoundError:
            return None
        except Exception as exc:  # unreachable storage: start over rather than fail
            log.warning("could not fetch the training checkpoint %s (%s)", self.key, exc)
            return None

    def delete(self) -> None:
        self.storage.delete(self.key)
