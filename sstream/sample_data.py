"""`sstream make-sample-data`: the synthetic lesion cohort, as a job with a configuration.

The slides themselves are drawn by `sstream.io.synthetic` (tiled JPEG pyramidal TIFFs whose
label is visible only at full resolution); this module holds the job's options, checked
before anything is written, and what it wrote.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sstream.errors import InputError
from sstream.io import make_sample_data
from sstream.options import Options, option

__all__ = ["SampleData", "SampleDataConfig", "write_sample_data"]


@dataclass
class SampleDataConfig(Options):
    """The options of `sstream make-sample-data` (`write_sample_data`)."""

    out: str = option(help="Output directory (images/, train.csv, val.csv).")
    count: int = option(32, "Number of slides (labels alternate 0, 1).")
    size: int = option(768, "Slide side in pixels (the maximum with --min-size).")
    min_size: int | None = option(None, "Draw each side from \\[min-size, size].")
    seed: int = option(0, "Seed: the same seed gives the same files.")
    val_fraction: float = option(0.25, "Share of slides in val.csv.")
    tiff_tile_size: int = option(256, "Tile side of the TIFFs written (multiple of 16; not the "
                                 "streaming --tile-size).")
    overwrite: bool = option(False, "Replace existing files.")
    regression: bool = option(False, "Regression data: every slide has lesions and its label "
                              "is their texture contrast in [0, 1].")
    patients: int | None = option(None, "A cohort: slide i belongs to patient i mod N (one "
                                  "label per patient), every CSV gets a patient column, "
                                  "val.csv holds whole patients and cohort.csv every slide "
                                  "(for sstream split).", shown="none")

    def validate(self) -> None:
        """InputError for a cohort that cannot be drawn."""
        if self.count < 2 or self.size <= 0 or (
                self.min_size is not None and not 0 < self.min_size <= self.size):
            raise InputError("need --count >= 2 and 0 < --min-size <= --size")
        if not 0 <= self.val_fraction < 1:
            raise InputError("--val-fraction must be in [0, 1)")
        if self.patients is not None and not 2 <= self.patients <= self.count:
            raise InputError("--patients must be in 2..--count")


@dataclass
class SampleData:
    """What `write_sample_data` wrote: `slides` slides under out/images/, the training and
    validation CSVs, and with patients the whole cohort's CSV (None without)."""

    slides: int
    train_csv: Path
    val_csv: Path
    cohort_csv: Path | None


def write_sample_data(config: SampleDataConfig | None = None,
                      on_slide: Callable[[int, int], None] | None = None,
                      **options: Any) -> SampleData:
    """Write the synthetic cohort `config` describes (`write_sample_data(out="data",
    count=8)` gives the options by name); `on_slide(done, count)` after each slide.
    Generation streams: any size fits in memory.

    Raises:
        InputError: options that cannot work. FileExistsError: a file exists and
            `overwrite` is off.
    """
    config = SampleDataConfig.given(config, options)
    config.validate()
    sides = config.size if config.min_size is None else (config.min_size, config.size)
    train_csv, val_csv = make_sample_data(
        config.out, config.count, sides, config.seed, config.val_fraction,
        config.tiff_tile_size, config.overwrite, on_slide=on_slide,
        regression=config.regression, patients=config.patients)
    cohort_csv = Path(config.out) / "cohort.csv" if config.patients is not None else None
    return SampleData(config.count, train_csv, val_csv, cohort_csv)
