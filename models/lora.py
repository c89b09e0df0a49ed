"""DreamBooth-LoRA training on a registry SD 1.x or SDXL base, with diffusers + peft.

Current APIs only: ``unet.add_adapter(LoraConfig(...))``, ``get_peft_model_state_dict``
+ ``convert_state_dict_to_diffusers``, ``StableDiffusionPipeline.save_lora_weights``;
rendering loads the result with ``pipe.load_lora_weights`` once per model
(:meth:`models.sd.SDModel.generate` with ``lora=``).

Training uses its own fp32 copies of the base components (the warm pipeline in the
cache is never modified). Instance prompt ``"a photo of <token> <subject>"``; inputs
are centre-cropped and resized to the training resolution; loss is MSE between the
UNet prediction and the noise (or v-target) for latents noised with
``scheduler.add_noise``. ``on_step(step, total)`` returning False stops the run after
that step, writes a checkpoint and raises :class:`~models.errors.Canceled`. A checkpoint
(LoRA weights, optimiser and RNG state; :mod:`models.lora_checkpoint`) is written every
``checkpoint_every`` steps, and also saved to ``store=`` when given (the worker's copy in
the job's storage); ``train(..., resume=True)`` continues from the newest local one, else
the stored one, and reaches the same weights as an uninterrupted run (on CPU).

SDXL (family ``sdxl``) trains a UNet-only LoRA the same way, conditioned like
diffusers' ``train_dreambooth_lora_sdxl.py``: the prompt goes through both text
encoders (penultimate hidden states concatenated; pooled projection of
``text_encoder_2`` as ``text_embeds``) and ``time_ids`` = original size + crop
top-left + target size, here ``(size, size, 0, 0, size, size)`` (the images are
centre-cropped and resized to ``size``, which is also what the pipeline uses at render
time by default). The result is written with ``StableDiffusionXLPipeline.save_lora_weights``
in the same layout, so the sdxl :class:`~models.sd.SDModel` loads it with ``lora=``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.compat import set_offline_env
from models.device import pick_device
from models.errors import Canceled, InvalidImage, InvalidRequest, ModelFileMissing, ModelLoadError
from models.lora_checkpoint import CheckpointStore, resume_state, save_checkpoint
from models.lora_checkpoint import latest_checkpoint as latest_checkpoint  # re-exported
from models.registry import ModelEntry, SDOptions

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], bool | None]
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def instance_prompt(token: str, subject: str) -> str:
    return f"a photo of {token} {subject}"


@dataclass(frozen=True)
class LoraTrainConfig:
    token: str = "sks"
    subject: str = "person"
    steps: int = 400
    rank: int = 4
    alpha: int | None = None  # None = rank
    learning_rate: float = 1e-4
    batch_size: int = 1
    resolution: int | None = None  # None = the base model's default width
    checkpoint_every: int = 100
    seed: int = 0
    max_grad_norm: float = 1.0
    target_modules: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")

    @property
    def prompt(self) -> str:
        return instance_prompt(self.token, self.subject)


@dataclass
class LoraTrainResult:
    output_dir: Path
    weights: Path
    steps: int
    resumed_from: int = 0
    losses: list[float] = field(default_factory=list)


def prepare_images(images: Sequence[Image.Image], size: int) -> Any:
    """Centre-crop to square, resize to ``size``, scale to [-1, 1]; (N, 3, size, size)."""
    import numpy as np
    import torch
    from PIL import Image as PILImage

    if not images:
        raise InvalidRequest("DreamBooth needs at least one instance image")
    out = []
    for im in images:
        if im.width < 8 or im.height < 8:
            raise InvalidImage("instance image too small")
        rgb = im.convert("RGB")
        side = min(rgb.size)
        left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
        rgb = rgb.crop((left, top, left + side, top + side)).resize(
            (size, size), PILImage.Resampling.BICUBIC
        )
        arr = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
        out.append(torch.from_numpy(arr.transpose(2, 0, 1).copy()))
    return torch.stack(out)


class DreamBoothLoraTrainer:
    """Trains a UNet LoRA for one subject on an SD 1.x or SDXL diffusers folder."""

    FAMILIES = ("sd15", "sdxl")

    def __init__(
        self,
        base: str | Path,
        options: SDOptions | None = None,
        *,
        device: str | None = None,
        family: str = "sd15",
    ) -> None:
        if family not in self.FAMILIES:
            raise InvalidRequest(
                f"DreamBooth-LoRA training supports {', '.join(self.FAMILIES)} bases, not {family}"
            )
        self.base = Path(base)
        self.options = options or SDOptions()
        self.device = pick_device(device)
        self.family = family

    @classmethod
    def from_entry(cls, entry: ModelEntry, *, device: str | None = None) -> DreamBoothLoraTrainer:
        if entry.family not in cls.FAMILIES:
            raise InvalidRequest(
                f"DreamBooth-LoRA training supports {', '.join(cls.FAMILIES)} bases,"
                f" not {entry.family}"
            )
        assert isinstance(entry.options, SDOptions)
        entry.check_files()
        return cls(entry.path, entry.options, device=device, family=entry.family)

    # ------------------------------------------------------------------ pieces
    def _load(self) -> dict[str, Any]:
        set_offline_env()
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        what = "SDXL diffusers folder" if self.family == "sdxl" else "SD 1.x diffusers folder"
        if not (self.base / "model_index.json").is_file():
            raise ModelFileMissing(self.base / "model_index.json", what)
        p = str(self.base)
        try:
            parts: dict[str, Any] = {
                "tokenizer": CLIPTokenizer.from_pretrained(
                    p, subfolder="tokenizer", local_files_only=True
                ),
                "text_encoder": CLIPTextModel.from_pretrained(
                    p, subfolder="text_encoder", local_files_only=True
                ),
                "vae": AutoencoderKL.from_pretrained(p, subfolder="vae", local_files_only=True),
                "unet": UNet2DConditionModel.from_pretrained(
                    p, subfolder="unet", local_files_only=True
                ),
                "scheduler": DDPMScheduler.from_pretrained(
                    p, subfolder="scheduler", local_files_only=True
                ),
            }
            if self.family == "sdxl":
                parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(
                    p, subfolder="tokenizer_2", local_files_only=True
                )
                parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                    p, subfolder="text_encoder_2", local_files_only=True
                )
            return parts
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load SD components from {self.base}: {exc}") from exc

    @staticmethod
    def _sdxl_prompt_embeds(parts: dict[str, Any], prompt: str, device: Any) -> tuple[Any, Any]:
        """(prompt_embeds, pooled_prompt_embeds) as SDXL's ``encode_prompt`` (no clip skip)."""
        import torch

        embeds, pooled = [], None
        for tok, te in (
            (parts["tokenizer"], parts["text_encoder"]),
            (parts["tokenizer_2"], parts["text_encoder_2"]),
        ):
            ids = tok(
                prompt,
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            enc = te(ids, output_hidden_states=True)
            pooled = enc[0]  # the final encoder's projected pooled output is kept
            embeds.append(enc.hidden_states[-2])
        return torch.cat(embeds, dim=-1), pooled

    # ------------------------------------------------------------------ train
    def train(
        self,
        images: Sequence[Image.Image],
        output_dir: str | Path,
        config: LoraTrainConfig | None = None,
        *,
        on_step: ProgressFn | None = None,
        resume: bool = True,
        store: CheckpointStore | None = None,
    ) -> LoraTrainResult:
        """Train and write ``output_dir/pytorch_lora_weights.safetensors``. With `store`,
        each periodic checkpoint is also saved there (not the one written on a stop), and a
        resume with no usable local checkpoint fetches it from there first."""
        import torch
        import torch.nn.functional as F
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft import LoraConfig
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        cfg = config or LoraTrainConfig()
        if cfg.steps < 1 or cfg.batch_size < 1 or cfg.rank < 1:
            raise InvalidRequest("steps, batch_size and rank must be >= 1")
        if not cfg.token.strip():
            raise InvalidRequest("token must not be empty")
        size = cfg.resolution or self.options.width
        if size % 8:
            raise InvalidRequest("resolution must be a multiple of 8")
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        device = torch.device(self.device)

        parts = self._load()
        tok, te, vae, unet, sched = (
            parts[k] for k in ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
        )
        sdxl = self.family == "sdxl"
        for m in (te, vae, unet, *([parts["text_encoder_2"]] if sdxl else [])):
            m.requires_grad_(False)
            m.to(device)
            if m is not unet:
                m.eval()
        # peft's gaussian init draws from the global RNG: seed it privately.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            unet.add_adapter(
                LoraConfig(
                    r=cfg.rank,
                    lora_alpha=cfg.alpha or cfg.rank,
                    init_lora_weights="gaussian",
                    target_modules=list(cfg.target_modules),
                )
            )
        unet.train()
        params = [p for p in unet.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)

        pixels = prepare_images(images, size).to(device)
        added: dict[str, Any] | None = None
        with torch.no_grad():
            if sdxl:
                text, pooled = self._sdxl_prompt_embeds(parts, cfg.prompt, device)
                time_ids = torch.tensor(
                    [[size, size, 0, 0, size, size]], dtype=text.dtype, device=device
                )
                added = {
                    "text_embeds": pooled.expand(cfg.batch_size, -1),
                    "time_ids": time_ids.expand(cfg.batch_size, -1),
                }
            else:
                ids = tok(
                    cfg.prompt,
                    padding="max_length",
                    max_length=tok.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids.to(device)
                text = te(ids)[0]
            dist = vae.encode(pixels).latent_dist
            mean, std = dist.mean, dist.std
        scaling = vae.config.scaling_factor
        n_train = int(sched.config.num_train_timesteps)

        start, losses = 0, []
        state = resume_state(out, cfg, unet, gen, store) if resume else None
        if state is not None:
            set_peft_model_state_dict(unet, state["lora"])
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["rng"])
            start, losses = state["step"], state["losses"]

        n = pixels.shape[0]
        for step in range(start, cfg.steps):
            idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
            eps = torch.randn(mean[idx].shape, generator=gen).to(device)
            latents = (mean[idx] + std[idx] * eps) * scaling
            noise = torch.randn(latents.shape, generator=gen).to(device)
            t = torch.randint(0, n_train, (cfg.batch_size,), generator=gen).to(device)
            noisy = sched.add_noise(latents, noise, t)
            if sched.config.prediction_type == "v_prediction":
                target = sched.get_velocity(latents, noise, t)
            else:
                target = noise
            pred = unet(
                noisy,
                t,
                encoder_hidden_states=text.expand(cfg.batch_size, -1, -1),
                added_cond_kwargs=added,
            ).sample
            loss = F.mse_loss(pred.float(), target.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            done = step + 1
            stop = on_step is not None and on_step(done, cfg.steps) is False
            periodic = bool(cfg.checkpoint_every) and done % cfg.checkpoint_every == 0
            if stop or (periodic and done < cfg.steps):
                path = save_checkpoint(out, unet, opt, gen, done, cfg, losses)
                if stop:
                    raise Canceled(done, cfg.steps, "LoRA training")
                if store is not None:
                    store.save(path, done)

        unet.eval()
        lora_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        pipe_cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
        pipe_cls.save_lora_weights(
            save_directory=str(out),
            unet_lora_layers=lora_layers,
            safe_serialization=True,
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        )
        (out / "tollgate_lora.json").write_text(
            json.dumps({"base": str(self.base), "prompt": cfg.prompt, **asdict(cfg)}, indent=2)
        )
        return LoraTrainResult(
            output_dir=out,
            weights=out / LORA_WEIGHTS,
            steps=cfg.steps,
            resumed_from=start,
            losses=losses,
        )
