"""sstream: exact streaming training of convolutional networks on gigapixel images.

The early, memory-hungry layers of a CNN run tile by tile, forward and backward, so memory
follows the tile size rather than the image size, while outputs and gradients equal ordinary
backpropagation on the whole image (Pinckaers, van Ginneken & Litjens, TPAMI 2020).
"""

from sstream.engine import (
    StreamGeometry,
    StreamingCNN,
    TensorSource,
    UnsupportedModuleError,
)

__all__ = ["StreamGeometry", "StreamingCNN", "TensorSource", "UnsupportedModuleError"]
__version__ = "0.1.0"
