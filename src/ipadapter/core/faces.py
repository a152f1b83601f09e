"""FaceID from face photos: insightface's detector and recogniser (the ``[faceid]`` extra), as ComfyUI does it.

Any object with insightface ``FaceAnalysis``'s interface works (tests inject a stub): ``get(bgr_array)`` returns
faces with ``normed_embedding`` (512), ``kps`` (5 landmarks) and ``bbox``, and ``det_model.input_size`` is the
detection size. Each photo is tried at detection sizes 640, 576, ..., 320 until a face is found (ComfyUI's
retries); the largest face is taken. FaceID-Plus also reads CLIP features of the face aligned to insightface's
ArcFace template (``norm_crop``: 224 px for SD 1.x, 256 for SDXL).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .encoders import load_image
from .errors import IPAdapterError

DETECTION_SIZES: tuple[int, ...] = tuple(range(640, 256, -64))
# insightface's ArcFace 112 x 112 template: eyes, nose tip, mouth corners
ARCFACE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                    [70.7299, 92.2041]], dtype=np.float64)
INSTALL = "pip install 'ipadapter[faceid]' (insightface and onnxruntime)"


def default_root() -> Path:
    return Path(os.environ.get("INSIGHTFACE_HOME", Path.home() / ".insightface"))


def load_face_analysis(root: str | os.PathLike | None = None, name: str = "buffalo_l", providers=None):
    """insightface's FaceAnalysis with the ``name`` model pack from ``root``/models/``name`` (no download)."""
    try:
        from insightface.app import FaceAnalysis
    except ImportError:
        raise IPAdapterError(f"FaceID from a photo (--face-image) needs insightface: {INSTALL}; or give "
                             "--face-embeds FILE") from None
    root = Path(root) if root is not None else default_root()
    pack = root / "models" / name
    if not pack.is_dir() or not any(pack.glob("*.onnx")):
        raise IPAdapterError(
            f"insightface's {name} model pack is not in {pack}: unzip {name}.zip (from insightface's model zoo) "
            f"there, or pass --insightface-root DIR (models are never downloaded at run time)"
        )
    try:
        analysis = FaceAnalysis(name=name, root=str(root), providers=providers or ["CPUExecutionProvider"])
        analysis.prepare(ctx_id=0, det_size=(640, 640))
    except Exception as e:  # noqa: BLE001 - a broken pack is bad input
        raise IPAdapterError(f"{pack}: cannot load insightface's {name} ({' '.join(str(e).split())[:120]})") from None
    return analysis


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The least-squares similarity transform (Umeyama) taking ``src`` points to ``dst``: a 2 x 3 matrix."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    scale = (sig * np.diag(sign)).sum() / s.var(0).sum()
    return np.hstack([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]])


def align_face(image: Image.Image, kps: np.ndarray, size: int = 224) -> Image.Image:
    """The face warped onto the ArcFace template at ``size`` (insightface's norm_crop rule: the template scaled by
    size/112 when 112 divides it, else by size/128 and shifted 8 x that ratio to the right), black outside."""
    ratio, shift = (size / 112.0, 0.0) if size % 112 == 0 else (size / 128.0, 8.0 * size / 128.0)
    dst = ARCFACE * ratio + np.array([shift, 0.0])
    m = similarity_transform(np.asarray(kps, dtype=np.float64).reshape(5, 2), dst)
    inv = np.linalg.inv(np.vstack([m, [0.0, 0.0, 1.0]]))[:2]  # PIL maps output pixels back to input pixels
    return image.transform((size, size), Image.Transform.AFFINE, tuple(inv.flatten()), Image.Resampling.BILINEAR)


def _largest(faces):
    def area(f):
        box = getattr(f, "bbox", None)
        return 0.0 if box is None else float((box[2] - box[0]) * (box[3] - box[1]))

    return max(faces, key=area)


def analyse_faces(photos: Sequence, analysis, crop_size: int = 224) -> tuple[torch.Tensor, list[Image.Image]]:
    """(normed embeddings [n, 512], aligned face crops) of one face per photo."""
    embeds, crops = [], []
    for k, photo in enumerate(photos):
        name = str(photo) if isinstance(photo, (str, os.PathLike)) else f"face image {k + 1}"
        image = load_image(photo)
        bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
        faces = None
        for size in DETECTION_SIZES:
            det = getattr(analysis, "det_model", None)
            if det is not None:
                det.input_size = (size, size)
            faces = analysis.get(bgr)
            if faces:
                break
        if not faces:
            raise IPAdapterError(f"{name}: no face found (tried detection sizes 640 down to 320); use a photo "
                                 "with a clear, front-facing face")
        face = _largest(faces)
        embeds.append(torch.as_tensor(np.asarray(face.normed_embedding, dtype=np.float32)).reshape(-1))
        crops.append(align_face(image, face.kps, crop_size))
    return torch.stack(embeds), crops
