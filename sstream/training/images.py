"""Training images: how one is read, and in which order an epoch sees them.

Everything random here is derived from (seed, epoch, position), never from a running
generator, so that a resumed run reads, crops and augments exactly as the uninterrupted one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from sstream.data import Augmentation, PixelSource, Sample
from sstream.engine import StreamingCNN
from sstream.errors import InputError
from sstream.stain import HedJitter, chain, fit_normaliser
from sstream.tissue import Tissue, output_mask

if TYPE_CHECKING:
    from sstream.train import TrainConfig

# Images up to this many pixels are read whole (uint8, 3 bytes a pixel: 192 MiB) by the
# prefetch thread while the previous image trains; larger ones (whole slides) are read region
# by region as the tiles ask, so no image is ever whole in memory.
IN_MEMORY_PIXELS = 2**26


def seeded_generator(seed: int, *keys: int) -> np.random.Generator:
    """A numpy generator determined by the seed and the position (epoch, image...)."""
    return np.random.default_rng([seed, *keys])


def epoch_order(seed: int, epoch: int, count: int, weights: np.ndarray | None = None
                ) -> np.ndarray:
    """The order of the training images in `epoch`, the same on every resume: a
    permutation, or with `weights` (a probability per image, `--balance sampler`) `count`
    draws with replacement, so that each class is drawn equally often on average."""
    generator = seeded_generator(seed, epoch, 0)
    if weights is None:
        return generator.permutation(count)
    return generator.choice(count, size=count, replace=True, p=weights)


def load_training_image(sample: Sample, config: TrainConfig, train: bool,
                        seed_keys: tuple[int, ...], dtype: torch.dtype = torch.float32,
                        tissue: Tissue | None = None) -> PixelSource:
    """One image (resolution, crop/pad, augmentation: `config.read_spec()`) as a PixelSource
    of pixels / 255 in `dtype`: held as uint8 up to IN_MEMORY_PIXELS, else read lazily from
    the open slide (the source owns it: `close()` it when done). With `tissue`, the source
    carries the slide's tissue mask, and random crops are centred on a random tissue point."""
    generator = seeded_generator(config.seed, *seed_keys)
    spec = config.read_spec(tissue.choice if tissue is not None else None)
    read = spec.open(sample, generator if train else None)
    try:
        augmentation = Augmentation.draw(generator) if (train and config.augment != "none") \
            else None
        stain = chain(  # per pixel, fixed per image: tiles see one transform
            fit_normaliser(config.stain_normalize, read.slide, read.resolution.level)
            if config.stain_normalize else None,
            HedJitter.draw(generator) if (train and config.augment == "stain") else None)
        region = read.source
        if region.height * region.width > IN_MEMORY_PIXELS:
            source = region.augmented(augmentation, dtype, read.slide)  # owns the slide now
        else:
            source = PixelSource.from_array(region.to_rgb_array(), augmentation, dtype=dtype,
                                            level0=region.level0)
            read.close()
    except BaseException:
        read.close()
        raise
    source.tissue = region.tissue
    source.stain = stain
    return source


def sample_output_mask(source: PixelSource, scnn: StreamingCNN, sample: Sample
                       ) -> torch.Tensor | None:
    """`output_mask` of `sample`'s image, its errors naming the image and CSV line."""
    try:
        return output_mask(source, scnn)
    except ValueError as exc:
        raise InputError(f"line {sample.row}: {sample.image.name}: {exc}") from None
