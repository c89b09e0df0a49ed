"""What keeping a tune's training checkpoint in storage costs per checkpoint: the storage PUT
(orchestrator.tunes.checkpoints.StoredCheckpoint.save) against the local checkpoint write it
follows (torch.save + rename), measured in the same run, for checkpoint sizes of real bases:
SD 1.5 and SDXL LoRA at rank 4 (LoRA weights + AdamW's two moments, fp32).

    python -m bench.checkpoint_store [--s3]   # --s3: also moto's S3 server (loopback)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

# LoRA parameters per unit of rank (attention to_q/k/v/out of the real UNets) x rank 4 x fp32
# x 3 (weights + two AdamW moments).
SIZES = {"sd15 r4": 199_296 * 4 * 4 * 3, "sdxl r4": 1_451_520 * 4 * 4 * 3}
REPEATS = 5


def _best(fn, repeats: int = REPEATS) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(best wall s, best process CPU s) of `repeats` calls."""
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus)


def main() -> None:
    import torch

    from orchestrator.storage import Storage
    from orchestrator.tunes.checkpoints import StoredCheckpoint

    parser = argparse.ArgumentParser()
    parser.add_argument("--s3", action="store_true")
    args = parser.parse_args()
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        backends = {"local": Storage(str(tmp / "storage"))}
        if args.s3:
            from tests.support.s3 import environ, moto_s3

            (tmp / "moto").mkdir()
            env = stack.enter_context(moto_s3(tmp / "moto"))
            stack.enter_context(environ(env))
            backends["moto s3"] = Storage(f"s3://{env['TOLLGATE_TEST_S3_BUCKET']}/bench")
        for label, n_bytes in SIZES.items():
            state = {"lora": torch.randn(n_bytes // 4)}
            path = tmp / "checkpoint-1.pt"

            def local_write(state: dict = state, path: Path = path) -> None:
                torch.save(state, path.with_suffix(".tmp"))
                path.with_suffix(".tmp").replace(path)

            base_wall, base_cpu = _best(local_write)
            print(
                f"{label}: {path.stat().st_size / 1e6:.1f} MB; local checkpoint write"
                f" {base_wall * 1e3:.0f} ms wall, {base_cpu * 1e3:.0f} ms CPU"
            )
            for name, storage in backends.items():
                store = StoredCheckpoint(storage, "bench")
                wall, cpu = _best(lambda store=store, path=path: store.save(path, 1))
                print(
                    f"  + store.save ({name}): {wall * 1e3:.0f} ms wall"
                    f" ({wall / base_wall:.2f}x the local write), {cpu * 1e3:.0f} ms CPU"
                )


if __name__ == "__main__":
    main()
