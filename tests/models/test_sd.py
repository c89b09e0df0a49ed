from __future__ import annotations

import numpy as np
import pytest

from models.errors import Canceled, InvalidRequest
from models.sd import NSFW_REASON, SDModel


def _px(im) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.asarray(im, dtype=np.int16)


def test_txt2img_size_count_seeds_and_progress(models_manager) -> None:
    steps: list[tuple[int, int]] = []
    res = models_manager.txt2img(
        "sd15",
        "a photo of a lighthouse",
        width=64,
        height=96,
        steps=4,
        seeds=[11, 12, 13],
        on_step=lambda s, n: steps.append((s, n)),
    )
    assert len(res.images) == 3 and res.seeds == [11, 12, 13] and res.not_delivered == []
    assert all(im is not None and im.size == (64, 96) and im.mode == "RGB" for im in res.images)
    assert [s for s, _ in steps] == [1, 2, 3, 4] and steps[-1] == (4, 4)
    assert len(res.delivered()) == 3


def test_same_seed_same_pixels_other_seed_differs(models_manager) -> None:
    a = models_manager.txt2img("sd15", "a red cube", steps=3, seeds=[7, 8])
    b = models_manager.txt2img("sd15", "a red cube", steps=3, seeds=[7])
    assert np.array_equal(_px(a.images[0]), _px(b.images[0]))
    assert np.abs(_px(a.images[0]) - _px(a.images[1])).mean() > 1.0


def test_cancel_stops_within_a_step(models_manager) -> None:
    seen: list[int] = []

    def on_step(step: int, total: int) -> bool:
        seen.append(step)
        return step < 2

    with pytest.raises(Canceled) as ei:
        models_manager.txt2img("sd15", "x", steps=10, seeds=[1, 2], on_step=on_step)
    assert ei.value.step == 2 and ei.value.total == 10
    assert seen == [1, 2]
    # the pipeline is usable again afterwards
    ok = models_manager.txt2img("sd15", "x", steps=2, seeds=[1])
    assert ok.images[0] is not None


def test_pluggable_safety_check_withholds_flagged_images(models_manager) -> None:
    def check(images):  # type: ignore[no-untyped-def]
        return [NSFW_REASON if i == 1 else None for i in range(len(images))]

    res = models_manager.txt2img("sd15", "x", steps=2, seeds=[1, 2, 3], safety_check=check)
    assert res.images[1] is None and res.images[0] is not None and res.images[2] is not None
    assert [(n.index, n.seed, n.reason) for n in res.not_delivered] == [(1, 2, NSFW_REASON)]
    assert [i for i, _, _ in res.delivered()] == [0, 2]


def test_loaded_once_across_consecutive_jobs(models_manager) -> None:
    for seed in (1, 2, 3):
        models_manager.txt2img("sd15", "x", steps=1, seeds=[seed])
    assert models_manager.load_count("sd15") == 1
    assert models_manager.cache.used_bytes > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"width": 60},
        {"height": 4096},
        {"steps": 0},
        {"seeds": []},
        {"seeds": list(range(9))},
        {"guidance": -1.0},
    ],
)
def test_invalid_requests(models_manager, kwargs) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequest):
        models_manager.txt2img("sd15", "x", **kwargs)


def test_eight_images_one_call(models_manager) -> None:
    res = models_manager.txt2img("sd15", "x", steps=2, seeds=list(range(8)))
    assert len(res.images) == 8 and len({im.tobytes() for im in res.images}) == 8


def test_sdxl(models_manager) -> None:
    total: list[int] = []
    res = models_manager.txt2img(
        "sdxl", "a cat", steps=3, seeds=[5, 6], on_step=lambda s, n: total.append(n)
    )
    assert [im.size for im in res.images] == [(64, 64), (64, 64)]
    again = models_manager.txt2img("sdxl", "a cat", steps=3, seeds=[5, 6])
    assert np.array_equal(_px(res.images[0]), _px(again.images[0]))
    alone = models_manager.txt2img("sdxl", "a cat", steps=3, seeds=[5])
    # alone vs in a batch: same seed, same image up to float batch effects
    assert np.abs(_px(res.images[0]) - _px(alone.images[0])).mean() < 0.5
    assert total[-1] == 3


def test_direct_model_class(models_registry) -> None:
    m = SDModel.from_entry(models_registry.get("sd15"), device="cpu")
    m.setup()
    m.setup()  # idempotent
    assert m.pipe is not None and m.nbytes() > 0
    m.unload()
    assert m.pipe is None


@pytest.mark.gpu
def test_sd_on_cuda(models_registry) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    m = SDModel.from_entry(models_registry.get("sd15"), device="cuda")
    res = m.generate("x", steps=2, seeds=[1, 2])
    assert m.pipe.unet.dtype == torch.float16
    assert [im.size for _, _, im in res.delivered()] == [(64, 64), (64, 64)]
