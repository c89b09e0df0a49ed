"""Stable Diffusion 1.x / SDXL text-to-image via diffusers, from a local folder.

Load once (``setup()``), then ``generate()`` any number of times. One batched pipeline
call renders 1..max_images images, each from its own ``torch.Generator`` seed, so an
image depends only on its seed and the job parameters (not on its position in the
batch... up to floating-point batch effects on GPU).

Progress and cancellation go through diffusers' ``callback_on_step_end``: ``on_step(step,
total)`` is called after every denoising step; returning ``False`` stops the run within
that step (the pipeline's ``_interrupt`` flag is set and the call is unwound before the
VAE decode) and :class:`~models.errors.Canceled` is raised.

Safety: a folder that ships diffusers' ``safety_checker`` uses it when the registry
option ``safety_checker`` is true; in addition any callable ``SafetyCheck`` can be
plugged in (per model or per call). Flagged images are not delivered: their slot in
``GenerateResult.images`` is ``None`` and ``not_delivered`` says why.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.cache import module_nbytes
from models.compat import set_offline_env
from models.device import dtype_for, empty_device_cache, pick_device
from models.errors import Canceled, InvalidRequest, ModelError, ModelLoadError
from models.registry import ModelEntry, SDOptions

if TYPE_CHECKING:
    from PIL import Image

# (images) -> one entry per image: None = fine, a string = why it must not be delivered.
SafetyCheck = Callable[[Sequence["Image.Image"]], Sequence[str | None]]
# (step, total) -> False to cancel; None/True to go on.
ProgressFn = Callable[[int, int], bool | None]

NSFW_REASON = "nsfw: flagged by safety checker"
MAX_STEPS = 200
MAX_LORAS = 4  # adapters kept loaded per pipeline


@dataclass
class NotDelivered:
    index: int
    seed: int
    reason: str


@dataclass
class GenerateResult:
    """Images in request order; a withheld image is ``None`` and listed in ``not_delivered``."""

    images: list[Image.Image | None]
    seeds: list[int]
    not_delivered: list[NotDelivered] = field(default_factory=list)
    width: int = 0
    height: int = 0
    steps: int = 0
    guidance: float = 0.0

    def delivered(self) -> list[tuple[int, int, Image.Image]]:
        """(index, seed, image) of every image that may be delivered."""
        return [
            (i, s, im)
            for i, (s, im) in enumerate(zip(self.seeds, self.images, strict=True))
            if im is not None
        ]


class _Stop(Exception):
    def __init__(self, step: int, total: int) -> None:
        super().__init__(step)
        self.step = step
        self.total = total


class SDModel:
    """A loaded SD 1.x or SDXL pipeline (family ``sd15`` / ``sdxl``)."""

    def __init__(
        self,
        path: str | Path,
        family: str = "sd15",
        options: SDOptions | None = None,
        *,
        device: str | None = None,
        safety_check: SafetyCheck | None = None,
        model_id: str | None = None,
    ) -> None:
        if family not in ("sd15", "sdxl"):
            raise ModelError(f"SDModel cannot load family {family!r}")
        self.path = Path(path)
        self.family = family
        self.options = options or SDOptions()
        self.device = pick_device(device)
        self.safety_check = safety_check
        self.model_id = model_id or self.path.name
        self.pipe: Any = None
        self._lock = threading.Lock()
        self._loras: dict[str, str] = {}  # lora dir -> adapter name (oldest first)
        self._lora_serial = 0

    @classmethod
    def from_entry(
        cls,
        entry: ModelEntry,
        *,
        device: str | None = None,
        safety_check: SafetyCheck | None = None,
    ) -> SDModel:
        assert isinstance(entry.options, SDOptions)
        entry.check_files()
        return cls(
            entry.path,
            entry.family,
            entry.options,
            device=device,
            safety_check=safety_check,
            model_id=entry.id,
        )

    # ------------------------------------------------------------------ lifecycle
    def setup(self) -> None:
        """Load the pipeline from the local folder (once)."""
        if self.pipe is not None:
            return
        set_offline_env()
        import diffusers

        dtype = dtype_for(self.device)
        cls = (
            diffusers.StableDiffusionXLPipeline
            if self.family == "sdxl"
            else diffusers.StableDiffusionPipeline
        )
        kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
        if self.family == "sd15":
            has_checker = (self.path / "safety_checker" / "config.json").is_file()
            if not (self.options.safety_checker and has_checker):
                kwargs.update(safety_checker=None, requires_safety_checker=False)
        try:
            pipe = cls.from_pretrained(str(self.path), **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"cannot load {self.family} pipeline from {self.path}: {exc}"
            ) from exc
        if self.options.scheduler:
            sched_cls = getattr(diffusers, self.options.scheduler, None)
            if sched_cls is None:
                raise ModelLoadError(f"unknown diffusers scheduler {self.options.scheduler!r}")
            pipe.scheduler = sched_cls.from_config(pipe.scheduler.config)
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe

    def nbytes(self) -> int:
        if self.pipe is None:
            return 0
        return module_nbytes(v for v in self.pipe.components.values())

    def unload(self) -> None:
        self.pipe = None
        self._loras.clear()
        empty_device_cache(self.device)

    # ------------------------------------------------------------------ LoRA
    def _use_lora(self, lora: str | Path | None, scale: float) -> None:
        pipe = self.pipe
        if lora is None:
            if self._loras:
                pipe.disable_lora()
            return
        key = str(Path(lora).resolve())
        name = self._loras.get(key)
        if name is None:
            while len(self._loras) >= MAX_LORAS:  # drop the oldest adapter
                old_key = next(iter(self._loras))
                pipe.delete_adapters(self._loras.pop(old_key))
            self._lora_serial += 1
            name = f"lora{self._lora_serial}"
            try:
                pipe.load_lora_weights(key, adapter_name=name)
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"cannot load LoRA from {key}: {exc}") from exc
            self._loras[key] = name
        else:
            self._loras[key] = self._loras.pop(key)  # most recently used last
        pipe.enable_lora()
        pipe.set_adapters([name], adapter_weights=[scale])

    # ------------------------------------------------------------------ run
    def _validate(
        self, width: int, height: int, steps: int, guidance: float, seeds: Sequence[int]
    ) -> None:
        o = self.options
        if not 1 <= len(seeds) <= o.max_images:
            raise InvalidRequest(f"number of images must be 1..{o.max_images}, got {len(seeds)}")
        for side in (width, height):
            if side < 8 or side % 8 or side > o.max_side:
                raise InvalidRequest(
                    f"width/height must be multiples of 8 in 8..{o.max_side}, got {width}x{height}"
                )
        if not 1 <= steps <= MAX_STEPS:
            raise InvalidRequest(f"steps must be 1..{MAX_STEPS}, got {steps}")
        if not 0.0 <= guidance <= 50.0:
            raise InvalidRequest(f"guidance must be 0..50, got {guidance}")
        for s in seeds:
            if not 0 <= int(s) < 2**63:
                raise InvalidRequest(f"seed out of range: {s}")

    def generate(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        *,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seeds: Sequence[int] = (0,),
        on_step: ProgressFn | None = None,
        safety_check: SafetyCheck | None = None,
        lora: str | Path | None = None,
        lora_scale: float = 1.0,
    ) -> GenerateResult:
        """Render ``len(seeds)`` images in one batched call.

        Raises :class:`Canceled` when ``on_step`` returns ``False``,
        :class:`InvalidRequest` for out-of-range parameters.
        """
        import torch

        o = self.options
        width = int(o.width if width is None else width)
        height = int(o.height if height is None else height)
        steps = int(o.steps if steps is None else steps)
        guidance = float(o.guidance if guidance is None else guidance)
        seeds = [int(s) for s in seeds]
        self._validate(width, height, steps, guidance, seeds)
        self.setup()
        pipe = self.pipe

        def callback(p: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            total = int(getattr(p, "num_timesteps", 0) or steps)
            if on_step is not None and on_step(i + 1, total) is False:
                p._interrupt = True
                raise _Stop(i + 1, total)
            return {}

        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        with self._lock:
            self._use_lora(lora, lora_scale)
            try:
                with torch.inference_mode():
                    out = pipe(
                        prompt=prompt,
                        negative_prompt=negative_prompt or None,
                        width=width,
                        height=height,
                        num_inference_steps=steps,
                        guidance_scale=guidance,
                        num_images_per_prompt=len(seeds),
                        generator=generators,
                        callback_on_step_end=callback,
                        output_type="pil",
                    )
            except _Stop as stop:
                raise Canceled(stop.step, stop.total, "generation") from None
            finally:
                pipe._interrupt = False

        images: list[Image.Image | None] = list(out.images)
        result = GenerateResult(
            images=images, seeds=seeds, width=width, height=height, steps=steps, guidance=guidance
        )
        flagged = getattr(out, "nsfw_content_detected", None) or [False] * len(images)
        reasons: list[str | None] = [NSFW_REASON if f else None for f in flagged]
        check = safety_check or self.safety_check
        if check is not None:
            extra = list(check([im for im in images if im is not None]))
            if len(extra) != len(images):
                raise ModelError("safety check returned the wrong number of verdicts")
            reasons = [r or e for r, e in zip(reasons, extra, strict=True)]
        for i, reason in enumerate(reasons):
            if reason:
                result.images[i] = None
                result.not_delivered.append(NotDelivered(i, seeds[i], reason))
        return result
