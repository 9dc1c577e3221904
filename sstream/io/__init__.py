"""Big-image I/O: lazy slide reading, streaming pyramidal TIFF writing, synthetic slides.

Depends on numpy, tifffile, zarr, imagecodecs and Pillow (OpenSlide optional); knows
nothing of models.

- `open_image(path, backend) -> SlideImage`: OpenSlide-style lazy reader (`read_region`,
  levels, mpp), through tifffile, Pillow or OpenSlide (`pip install 'sstream[openslide]'`).
- `info.slide_info(path)`: what a slide holds (`sstream info`).
- `TiffMapWriter`: writes a map band by band into a tiled pyramidal BigTIFF.
- `atomic_output(path)`: temporary sibling renamed onto `path` on success.
- `write_synthetic_slide`, `make_sample_data`: the synthetic lesion dataset.
"""

from sstream.io.atomic import atomic_output
from sstream.io.reader import (
    BACKENDS,
    PIL_MAX_PIXELS,
    ImageReadError,
    SlideImage,
    open_image,
    positive_number,
    read_downsampled,
    to_rgb8,
)
from sstream.io.synthetic import make_sample_data, write_synthetic_slide
from sstream.io.writer import TiffMapWriter, downsample_2x2, pyramid_shapes

__all__ = [
    "BACKENDS",
    "PIL_MAX_PIXELS",
    "ImageReadError",
    "SlideImage",
    "TiffMapWriter",
    "atomic_output",
    "downsample_2x2",
    "make_sample_data",
    "open_image",
    "positive_number",
    "pyramid_shapes",
    "read_downsampled",
    "to_rgb8",
    "write_synthetic_slide",
]
