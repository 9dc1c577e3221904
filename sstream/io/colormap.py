"""The colormap of saliency maps (overview PNGs and the viewer's overlays)."""

from __future__ import annotations

import numpy as np

# Matt Zucker's degree-6 polynomial fit of matplotlib's inferno (CC0): rows c0..c6, (r, g, b).
_INFERNO = np.array([
    [0.0002189403691192265, 0.001651004631001012, -0.01948089843709184],
    [0.1065134194856116, 0.5639564367884091, 3.932712388889277],
    [11.60249308247187, -3.972853965665698, -15.9423941062914],
    [-41.70399613139459, 17.43639888205313, 44.35414519872813],
    [77.162935699427, -33.40235894210092, -81.80730925738993],
    [-71.31942824499214, 32.62606426397723, 73.20951985803202],
    [25.13112622477341, -12.24266895238567, -23.07032500287172],
])


def inferno(t: np.ndarray) -> np.ndarray:
    """The perceptually uniform `inferno` colormap: t in [0, 1] (any shape) -> uint8 RGB
    (..., 3), black through purple and orange to pale yellow."""
    t = np.clip(np.asarray(t, np.float64), 0.0, 1.0)[..., None]
    rgb = np.zeros(t.shape[:-1] + (3,))
    for coefficients in _INFERNO[::-1]:  # Horner
        rgb = rgb * t + coefficients
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)
