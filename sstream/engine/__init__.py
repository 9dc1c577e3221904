"""The streaming engine: geometry of local CNNs, tile plans and the exact StreamingCNN.

Depends on torch only; knows nothing of files, models or the command line.
"""

from sstream.engine.geometry import AxisWindow, StreamGeometry, UnsupportedModuleError, analyse
from sstream.engine.streaming import (
    ENGINES,
    ImageSource,
    InputGradSink,
    OutputGradient,
    StreamingCNN,
    TensorSource,
    TileProgress,
)
from sstream.engine.tiling import Box, Tile, TilePlan, make_plan

__all__ = [
    "ENGINES", "AxisWindow", "Box", "ImageSource", "InputGradSink", "OutputGradient",
    "StreamGeometry", "StreamingCNN", "TensorSource", "Tile", "TileProgress", "TilePlan",
    "UnsupportedModuleError", "analyse", "make_plan",
]
