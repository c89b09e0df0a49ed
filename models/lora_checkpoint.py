"""LoRA training checkpoints: LoRA weights, optimiser and RNG state, step and losses, in
``<output_dir>/checkpoints/checkpoint-<step>.pt`` (only the newest is kept), and optionally
a copy somewhere off this machine (a :class:`CheckpointStore`, given by the caller: the
worker passes one backed by the job's storage) so that a run redelivered to another machine
resumes too.

Reading a checkpoint: one that cannot be read or is incomplete is ignored with a log line
(training starts over), and so is one made with a different training config (two workers
set up differently, say): that is no fault of the job's own, so it never fails the job."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from models.lora import LoraTrainConfig

log = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"^checkpoint-(\d+)\.pt$")
FETCHED_NAME = "fetched.pt"  # a stored checkpoint copied here to be read (not a local one)


class CheckpointStore(Protocol):
    """Keeps the latest checkpoint of one training run off this machine."""

    def save(self, path: Path, step: int) -> None:
        """Store the checkpoint file `path` (written at `step`), replacing the previous one."""

    def fetch(self, dest: Path) -> Path | None:
        """Copy the stored checkpoint to the local file `dest`; None when there is none."""


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckdir = checkpoint_dir(output_dir)
    if not ckdir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in ckdir.iterdir() if (m := _CKPT_RE.match(p.name))]
    return max(found)[1] if found else None


def config_json(cfg: LoraTrainConfig) -> str:
    return json.dumps(asdict(cfg))


def save_checkpoint(
    output_dir: Path,
    unet: Any,
    opt: Any,
    gen: Any,
    step: int,
    cfg: LoraTrainConfig,
    losses: list[float],
) -> Path:
    """Write the step's checkpoint (temp file + rename) and delete the older local ones."""
    import torch
    from peft.utils import get_peft_model_state_dict

    ckdir = checkpoint_dir(output_dir)
    ckdir.mkdir(parents=True, exist_ok=True)
    path = ckdir / f"checkpoint-{step}.pt"
    state = {
        "lora": {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(unet).items()},
        "optimizer": opt.state_dict(),
        "rng": gen.get_state(),
        "step": step,
        "losses": list(losses),
        "config": config_json(cfg),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    for old in ckdir.iterdir():
        if (m := _CKPT_RE.match(old.name)) and int(m.group(1)) != step:
            old.unlink(missing_ok=True)
    return path


def read_checkpoint(path: Path, cfg: LoraTrainConfig, unet: Any, gen: Any) -> dict[str, Any] | None:
    """The checkpoint's state if it is whole and fits this run; None (logged) if unreadable
    or incomplete, or made with a different training config."""
    import torch
    from peft.utils import get_peft_model_state_dict

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        config = json.loads(state["config"])
        step, losses, lora = int(state["step"]), list(state["losses"]), dict(state["lora"])
        rng, optimizer = state["rng"], dict(state["optimizer"])
    except Exception as exc:  # anything unreadable is ignored, never fatal
        log.warning("ignoring unreadable LoRA checkpoint %s (%s); training starts over", path, exc)
        return None
    if config != json.loads(config_json(cfg)):
        log.warning(
            "ignoring LoRA checkpoint %s: made with a different training config; "
            "training starts over",
            path,
        )
        return None
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(unet).items()}
    problem = None
    if not 0 < step <= cfg.steps or len(losses) != step:
        problem = f"step {step} with {len(losses)} losses"
    elif {k: tuple(getattr(v, "shape", ())) for k, v in lora.items()} != expected:
        problem = "LoRA tensors do not match the model"
    elif not isinstance(rng, torch.Tensor) or rng.shape != gen.get_state().shape:
        problem = "bad RNG state"
    elif not {"state", "param_groups"} <= optimizer.keys():
        problem = "bad optimiser state"
    if problem is not None:
        log.warning("ignoring bad LoRA checkpoint %s (%s); training starts over", path, problem)
        return None
    return {"lora": lora, "optimizer": optimizer, "rng": rng, "step": step, "losses": losses}


def resume_state(
    output_dir: Path,
    cfg: LoraTrainConfig,
    unet: Any,
    gen: Any,
    store: CheckpointStore | None,
) -> dict[str, Any] | None:
    """The state to resume from: the newest local checkpoint, else (none, or unreadable) the
    stored one, else None (start over)."""
    local = latest_checkpoint(output_dir)
    if local is not None:
        state = read_checkpoint(local, cfg, unet, gen)
        if state is not None:
            log.info("resuming LoRA training from %s (step %d)", local, state["step"])
            return state
    if store is None:
        return None
    fetched = store.fetch(checkpoint_dir(output_dir) / FETCHED_NAME)
    if fetched is None:
        return None
    try:
        state = read_checkpoint(fetched, cfg, unet, gen)
    finally:
        fetched.unlink(missing_ok=True)
    if state is not None:
        log.info("resuming LoRA training from the stored checkpoint (step %d)", state["step"])
    return state
