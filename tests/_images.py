"""A generated JPEG ImageFolder (ImageNet layout: root/train/<class>/*.jpg, root/val/<class>/*.jpg)."""

from __future__ import annotations

from pathlib import Path


def jpeg_folder(root: Path, counts: dict[str, int], size: int = 40) -> Path:
    """Images of different sizes and colours (with a gradient, so crops differ), `counts` per class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, (cls, n) in enumerate(counts.items()):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                w, h = size + 3 * i, size - (i % 3)
                ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
                base = np.array([40 * c, 9 * i, 200])[None, None, :]
                pixels = (0.5 * ramp + 0.5 * base + rng.normal(0, 20, (h, w, 3))).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.jpg", quality=90)
    return root
