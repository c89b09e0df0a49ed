"""The model layer's front door: registry + warm cache + family classes.

A worker creates one :class:`ModelManager` per process (or uses
:func:`default_manager`) and calls the job-level methods; every model is loaded once
and kept warm in the :class:`~models.cache.ModelCache` until the memory budget evicts it.
Pure of Celery/Redis/DB.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from models.background import BackgroundRemover
from models.cache import ModelCache, default_cache
from models.device import pick_device
from models.errors import ModelConfigError
from models.esrgan import Upscaler
from models.gfpgan import FaceEnhancer, FaceResult
from models.lora import DreamBoothLoraTrainer, LoraTrainConfig, LoraTrainResult
from models.lora_checkpoint import CheckpointStore
from models.registry import GFPGANOptions, ModelEntry, Registry, load_registry
from models.sd import GenerateResult, ProgressFn, SafetyCheck, SDModel

if TYPE_CHECKING:
    from PIL import Image

LoadedModel = SDModel | Upscaler | FaceEnhancer | BackgroundRemover
M = TypeVar("M", SDModel, Upscaler, FaceEnhancer, BackgroundRemover)

_FAMILY_CLASS: dict[str, type] = {
    "sd15": SDModel,
    "sdxl": SDModel,
    "esrgan": Upscaler,
    "gfpgan": FaceEnhancer,
    "rembg": BackgroundRemover,
}


class ModelManager:
    """Loads registry models on demand, once, into a shared warm cache."""

    def __init__(
        self,
        registry: Registry | str | Path | None = None,
        *,
        cache: ModelCache | None = None,
        device: str | None = None,
        safety_check: SafetyCheck | None = None,
    ) -> None:
        if not isinstance(registry, Registry):
            # Files are checked per model when it loads (and by check_files() at start-up),
            # so a worker can serve the models it has even if others are missing.
            registry = load_registry(registry, check_files=False)
        self.registry = registry
        self.cache = cache if cache is not None else default_cache()
        self.device = pick_device(device)
        self.safety_check = safety_check

    # ------------------------------------------------------------------ loading
    def check_files(self, ids: list[str] | None = None) -> None:
        """Worker start-up check (raises ModelFileMissing)."""
        self.registry.check_files(ids)

    def _key(self, model_id: str) -> str:
        return model_id

    def _load(self, entry: ModelEntry) -> LoadedModel:
        model: LoadedModel
        if entry.family in ("sd15", "sdxl"):
            model = SDModel.from_entry(entry, device=self.device, safety_check=self.safety_check)
        elif entry.family == "esrgan":
            model = Upscaler.from_entry(entry, device=self.device)
        elif entry.family == "gfpgan":
            model = FaceEnhancer.from_entry(entry, device=self.device)
        elif entry.family == "rembg":
            model = BackgroundRemover.from_entry(entry, device=self.device)
        else:  # pragma: no cover - registry validates families
            raise ModelConfigError(f"unknown family {entry.family!r}")
        model.setup()
        return model

    def get(self, model_id: str) -> LoadedModel:
        """The loaded model for ``model_id`` (loads it on first use)."""
        entry = self.registry.get(model_id)
        return self.cache.get(self._key(model_id), lambda: self._load(entry))

    def _typed(self, model_id: str, cls: type[M]) -> M:
        entry = self.registry.get(model_id)
        if _FAMILY_CLASS[entry.family] is not cls:
            raise ModelConfigError(
                f"model {model_id!r} is a {entry.family} model, not {cls.__name__}"
            )
        model = self.get(model_id)
        assert isinstance(model, cls)
        return model

    def sd(self, model_id: str) -> SDModel:
        return self._typed(model_id, SDModel)

    def upscaler(self, model_id: str) -> Upscaler:
        return self._typed(model_id, Upscaler)

    def face_enhancer(self, model_id: str) -> FaceEnhancer:
        return self._typed(model_id, FaceEnhancer)

    def background_remover(self, model_id: str) -> BackgroundRemover:
        return self._typed(model_id, BackgroundRemover)

    def load_count(self, model_id: str) -> int:
        return self.cache.load_count(self._key(model_id))

    # ------------------------------------------------------------------ jobs
    def txt2img(
        self,
        model_id: str,
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
        return self.sd(model_id).generate(
            prompt,
            negative_prompt,
            width=width,
            height=height,
            steps=steps,
            guidance=guidance,
            seeds=seeds,
            on_step=on_step,
            safety_check=safety_check,
            lora=lora,
            lora_scale=lora_scale,
        )

    def upscale(self, model_id: str, image: Image.Image, *, tile: int | None = None) -> Image.Image:
        return self.upscaler(model_id).upscale(image, tile=tile)

    def face_enhance(
        self,
        model_id: str,
        image: Image.Image,
        *,
        weight: float | None = None,
        max_faces: int | None = None,
    ) -> FaceResult:
        enhancer = self.face_enhancer(model_id)
        entry = self.registry.get(model_id)
        assert isinstance(entry.options, GFPGANOptions)
        bg = self.upscaler(entry.options.bg_upsampler) if entry.options.bg_upsampler else None
        return enhancer.enhance(image, weight=weight, max_faces=max_faces, bg_upsampler=bg)

    def train_lora(
        self,
        model_id: str,
        images: Sequence[Image.Image],
        output_dir: str | Path,
        config: LoraTrainConfig | None = None,
        *,
        on_step: ProgressFn | None = None,
        resume: bool = True,
        store: CheckpointStore | None = None,
    ) -> LoraTrainResult:
        """DreamBooth-LoRA on an sd15/sdxl entry; render it with ``txt2img(..., lora=output_dir)``.
        ``store``: a ``models.lora_checkpoint.CheckpointStore`` that keeps checkpoints too."""
        trainer = DreamBoothLoraTrainer.from_entry(self.registry.get(model_id), device=self.device)
        return trainer.train(
            images, output_dir, config, on_step=on_step, resume=resume, store=store
        )

    def remove_background(
        self, model_id: str, image: Image.Image, *, alpha_matting: bool | None = None
    ) -> Image.Image:
        return self.background_remover(model_id).remove(image, alpha_matting=alpha_matting)


_default: ModelManager | None = None
_default_lock = threading.Lock()


def default_manager() -> ModelManager:
    """Process-wide manager over ``$TOLLGATE_MODELS`` and the default cache."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ModelManager()
        return _default


def describe(model: Any) -> str:
    return f"{type(model).__name__}({getattr(model, 'model_id', '?')})"
