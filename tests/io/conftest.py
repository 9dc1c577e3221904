"""Small test images in every layout the reader supports, with their fully loaded pixels."""

import numpy as np
import pytest
import tifffile

H, W = 300, 410  # not a multiple of any tile size: every level has partial edge tiles


def rgb_image(seed: int = 0, height: int = H, width: int = W) -> np.ndarray:
    """Smooth-ish RGB uint8 content (JPEG-friendly) with some noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1)
    return (base + rng.integers(0, 20, base.shape)).clip(0, 255).astype(np.uint8)


def halve(a: np.ndarray) -> np.ndarray:
    """A reduced level for test files (any rule will do: the reader reads what is stored)."""
    return np.ascontiguousarray(a[::2, ::2])


def aperio_description(width: int, height: int, mpp: float) -> str:
    return (
        f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] "
        f"(256x256) JPEG/RGB Q=70|AppMag = 20|MPP = {mpp}|Filename = test"
    )


def write_layout(path, layout: str, image: np.ndarray) -> None:
    """Write `image` (and reduced levels for pyramids) in a named TIFF layout."""
    rgb = {"photometric": "rgb"}
    if layout.startswith("tiled-"):
        compression = layout.split("-", 1)[1]
        args = {"compressionargs": {"level": 95}} if compression == "jpeg" else {}
        tifffile.imwrite(path, image, tile=(64, 64), compression=compression, **rgb, **args)
    elif layout == "striped":
        tifffile.imwrite(path, image, rowsperstrip=37, compression="zlib", **rgb)
    elif layout == "striped-lzw":
        tifffile.imwrite(path, image, rowsperstrip=16, compression="lzw", **rgb)
    elif layout == "bigtiff":
        tifffile.imwrite(path, image, bigtiff=True, tile=(64, 64), compression="zlib", **rgb)
    elif layout == "subifds":
        with tifffile.TiffWriter(path) as tw:
            tw.write(image, tile=(64, 64), compression="zlib", subifds=2, **rgb)
            tw.write(halve(image), tile=(64, 64), compression="zlib", subfiletype=1, **rgb)
            tw.write(halve(halve(image)), tile=(64, 64), compression="zlib", subfiletype=1, **rgb)
    elif layout == "reduced-pages":
        with tifffile.TiffWriter(path, bigtiff=True) as tw:
            tw.write(image, tile=(64, 64), compression="jpeg", metadata=None, **rgb)
            for level in (halve(image), halve(halve(image))):
                tw.write(
                    level, tile=(64, 64), compression="jpeg", subfiletype=1, metadata=None, **rgb
                )
    elif layout == "svs":
        h, w = image.shape[:2]
        with tifffile.TiffWriter(path) as tw:
            desc = aperio_description(w, h, 0.499)
            tw.write(
                image, tile=(64, 64), compression="jpeg", description=desc, metadata=None, **rgb
            )
            thumb = image[::8, ::8]
            tw.write(thumb, description=desc + " -> thumbnail", metadata=None, **rgb)
            for level in (halve(image), halve(halve(image))):
                tw.write(
                    level, tile=(64, 64), compression="jpeg", description=desc, metadata=None, **rgb
                )
            tw.write(thumb, subfiletype=1, description="Aperio label", metadata=None, **rgb)
            tw.write(thumb, subfiletype=9, description="Aperio macro", metadata=None, **rgb)
    elif layout == "ome":
        with tifffile.TiffWriter(path, ome=True, bigtiff=True) as tw:
            meta = {"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25}
            tw.write(image, tile=(64, 64), compression="zlib", subifds=1, metadata=meta, **rgb)
            tw.write(halve(image), tile=(64, 64), compression="zlib", subfiletype=1, **rgb)
    else:
        raise ValueError(layout)


LAYOUTS = [
    "tiled-none",
    "tiled-zlib",
    "tiled-lzw",
    "tiled-zstd",
    "tiled-jpeg",
    "tiled-jpeg2000",
    "striped",
    "striped-lzw",
    "bigtiff",
    "subifds",
    "reduced-pages",
    "svs",
    "ome",
]


@pytest.fixture(params=LAYOUTS)
def layout_file(request, tmp_path):
    """(path, layout, per-level fully loaded RGB arrays as tifffile decodes them)."""
    path = tmp_path / f"{request.param}.tif"
    write_layout(path, request.param, rgb_image())
    with tifffile.TiffFile(path) as tf:
        levels = [tf.series[0].levels[i].asarray() for i in range(len(tf.series[0].levels))]
    return path, request.param, levels
