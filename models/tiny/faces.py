"""The tiny kit's facexlib weights: a RetinaFace (ResNet-50) detector and a ParseNet face
parser, random except for their heads. The detector's box and landmark heads output the
anchor box and a canonical 5-point face layout, and its classification head fires only on
the stride-16 / 128 px anchors, along a direction of the feature space calibrated at build
time (a weighted logistic regression) so that flat images score far below facexlib's 0.97
threshold and scikit-image's astronaut photo scores above it. The parser labels every pixel
"skin", so GFPGAN's paste-back mask covers the aligned face crop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.compat import ensure_basicsr_compat
from models.tiny.helpers import set_seed

# Canonical 5-point layout (eyes, nose, mouth corners) relative to the face box, in
# units of the box size, from facexlib's 512 px FFHQ template.
_FACE_POINTS = [
    (192.98, 239.95),
    (318.90, 240.19),
    (256.63, 314.02),
    (201.26, 371.41),
    (313.09, 371.15),
]

# Face position in skimage's astronaut photo (512 px): centre ~(225, 115), ~110 px wide.
# Positive training cells (row, col) on the stride-16 grid, per anchor:
# anchor 0 (64 px) on the 256 px copy, anchor 1 (128 px) on the 512 px original.
_FACE_CELLS = {0: (256, [(3, 6), (3, 7)]), 1: (512, [(7, 13), (7, 14)])}


def _calibration_images() -> tuple[dict[int, Any], list[Any]]:
    """({size: astronaut BGR}, [faceless BGR images]) as uint8 arrays."""
    import cv2
    import numpy as np
    from skimage import data

    astro = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    faces = {256: cv2.resize(astro, (256, 256), interpolation=cv2.INTER_AREA), 512: astro}
    flats = []
    for size, values in (
        (128, (0, 64, 128, 192, 255)),
        (256, (0, 32, 64, 96, 128, 160, 192, 224, 255)),
        (512, (128,)),
    ):
        for v in values:
            flats.append(np.full((size, size, 3), v, dtype=np.uint8))
    return faces, flats


def _retina_features(model: Any, img: Any) -> Any:
    """Stride-16 SSH features (rows, cols, 256) for a BGR uint8 image, as facexlib computes them."""
    import torch

    x = torch.from_numpy(img.astype("float32").transpose(2, 0, 1)).unsqueeze(0)
    x = x - model.mean_tensor
    with torch.no_grad():
        out = list(model.body(x).values())
        fpn = model.fpn(out)
        f = model.ssh2(fpn[1])
    return f[0].permute(1, 2, 0).double()


def _fit_linear(pos: Any, neg: Any) -> tuple[Any, float]:
    """Weighted logistic regression; returns (w, b) mapping the weakest positive to
    logit +8 and the strongest negative to -8. Raises if not separable."""
    import torch

    x = torch.cat([pos, neg])
    scale = float(x.std()) or 1.0
    x = x / scale
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    weight = torch.where(y > 0, len(neg) / len(pos), 1.0).double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> Any:
        opt.zero_grad()
        logits = x @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, weight=weight)
        loss = loss + 1e-4 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        s = x @ w + b
        lo = float(s[len(pos) :].max())
        hi = float(s[: len(pos)].min())
        if not hi > lo:
            raise RuntimeError("tiny RetinaFace calibration failed (not separable)")
        alpha = 16.0 / (hi - lo)
        mid = (hi + lo) / 2.0
        return (alpha * w / scale).detach(), float(alpha * (b - mid))


def build_facexlib(out: Path, seed: int) -> dict[str, Path]:
    ensure_basicsr_compat()
    import torch
    from facexlib.detection.retinaface import RetinaFace
    from facexlib.parsing.parsenet import ParseNet

    out.mkdir(parents=True, exist_ok=True)
    set_seed(seed)
    det = RetinaFace(network_name="resnet50", half=False, phase="test", device="cpu")
    det.eval()
    with torch.no_grad():
        # Box head -> the anchor itself; landmark head -> canonical 5 points in the anchor.
        for head in det.BboxHead:
            head.conv1x1.weight.zero_()
            head.conv1x1.bias.zero_()
        pts = torch.tensor([((x - 256.0) / 512.0, (y - 256.0) / 512.0) for x, y in _FACE_POINTS])
        landm_bias = (pts.flatten() / 0.1).repeat(2)  # decode_landm: prior + pre*0.1*size
        for head in det.LandmarkHead:
            head.conv1x1.weight.zero_()
            head.conv1x1.bias.copy_(landm_bias)
        # Class head: background everywhere ([bg, face] logits per anchor) ...
        for head in det.ClassHead:
            head.conv1x1.weight.zero_()
            head.conv1x1.bias.copy_(torch.tensor([10.0, -10.0, 10.0, -10.0]))

    # ... except on the stride-16 level, where a linear "face" logit is fitted per anchor.
    faces, flats = _calibration_images()
    face_feats = {size: _retina_features(det, im) for size, im in faces.items()}
    flat_feats = torch.cat([_retina_features(det, im).reshape(-1, 256) for im in flats])
    head = det.ClassHead[1].conv1x1
    new_w = torch.zeros_like(head.weight)
    new_b = torch.tensor([0.0, -10.0, 0.0, -10.0])
    for anchor, (size, cells) in _FACE_CELLS.items():
        pos = torch.stack([face_feats[size][r, c] for r, c in cells])
        negs = [flat_feats]
        for fsize, feats in face_feats.items():
            rows, cols = feats.shape[:2]
            # cells of this image that overlap the face are neither positive nor negative
            cr, cc = (115 * fsize // 512) // 16, (225 * fsize // 512) // 16
            keep = [
                feats[r, c]
                for r in range(rows)
                for c in range(cols)
                if abs(r - cr) > 2 or abs(c - cc) > 2
            ]
            negs.append(torch.stack(keep))
        w, b = _fit_linear(pos, torch.cat(negs))
        new_w[2 * anchor + 1, :, 0, 0] = w.float()
        new_b[2 * anchor + 1] = b
    with torch.no_grad():
        head.weight.copy_(new_w)
        head.bias.copy_(new_b)
    det_path = out / "detection_Resnet50_Final.pth"
    torch.save({k: v.detach().clone() for k, v in det.state_dict().items()}, det_path)

    set_seed(seed + 1)
    parse = ParseNet(in_size=512, out_size=512, parsing_ch=19)
    with torch.no_grad():
        # Random parsing would label most pixels as background/hair/etc. and GFPGAN's
        # paste-back (mask from the face classes) would paste nothing. Make the parser
        # say "skin" (class 1) everywhere, so the restored crop is visibly pasted back.
        conv = parse.out_mask_conv.conv2d
        conv.weight.zero_()
        conv.bias.zero_()
        conv.bias[1] = 1.0
    parse_path = out / "parsing_parsenet.pth"
    torch.save({k: v.detach().clone() for k, v in parse.state_dict().items()}, parse_path)
    return {"detection": det_path, "parsing": parse_path}
