"""sstream: exact streaming training of convolutional networks on gigapixel images.

The early, memory-hungry layers of a CNN run tile by tile, forward and backward, so memory
follows the tile size rather than the image size, while outputs and gradients equal ordinary
backpropagation on the whole image (Pinckaers, van Ginneken & Litjens, TPAMI 2020).

The engine (`StreamingCNN`) and the jobs load on first use, so that `import sstream` (and
`import sstream.io`, which knows nothing of torch) stays light:

    sstream.saliency(slide, checkpoint, out)      the saliency module, callable as its
                                                  compute_saliency function
    sstream.estimate_memory(...)  sstream.load_checkpoint(path)  sstream.build_model(config)
    sstream.ReadSpec(mpp=0.5).open(slide)         how a slide is read (sstream.reading)
    sstream.model_input(model, slide)             predict's pixels and tissue mask for a
                                                  loaded model: model(x.pixels, mask=x.mask)
    from sstream.train import train, TrainConfig
    from sstream.predict import predict, PredictConfig
"""

from __future__ import annotations

import importlib
from typing import Any

from sstream.errors import SstreamError

__version__ = "0.1.0"

# loaded on first access too, so that `import sstream.io` (a decode worker process, say) does
# not import torch
_LAZY = {
    "ImageSource": ("sstream.engine", "ImageSource"),
    "StreamGeometry": ("sstream.engine", "StreamGeometry"),
    "StreamingCNN": ("sstream.engine", "StreamingCNN"),
    "TensorSource": ("sstream.engine", "TensorSource"),
    "UnsupportedModuleError": ("sstream.engine", "UnsupportedModuleError"),
    "saliency": ("sstream.saliency", None),
    "estimate_memory": ("sstream.estimate", "estimate_memory"),
    "load_checkpoint": ("sstream.models", "load_checkpoint"),
    "build_model": ("sstream.models", "build_model"),
    "ModelConfig": ("sstream.models", "ModelConfig"),
    "ReadSpec": ("sstream.reading", "ReadSpec"),
    "model_input": ("sstream.reading", "model_input"),
}

__all__ = ["SstreamError", *_LAZY]


def __getattr__(name: str) -> Any:
    """Load a job or model helper on first access (PEP 562)."""
    if name in _LAZY:
        module, attribute = _LAZY[name]
        loaded = importlib.import_module(module)
        value = loaded if attribute is None else getattr(loaded, attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sstream' has no attribute {name!r}")
