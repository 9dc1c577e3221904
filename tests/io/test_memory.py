"""Peak RSS of streaming a 20000 x 20000 map in and out stays far below the image size.

Each measurement runs `memory_probe.py` in a fresh interpreter (no torch, peak reset after
imports), so the figure is the I/O code's own.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("memory_probe.py")
SIZE = 20_000  # 400 MP: 400 MB as uint8, 1.2 GB as RGB reads


def probe(*args) -> dict:
    result = subprocess.run(
        [sys.executable, str(PROBE), *map(str, args)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_write_then_read_20000_square_in_bounded_memory(tmp_path):
    path = tmp_path / "big.tif"
    written = probe("write", path, SIZE, "uint8")
    assert path.exists()
    assert written["growth_mb"] < 150, written  # the map alone is 400 MB
    read = probe("read", path, SIZE, 2048)  # every 2048 x 2048 region of every level
    sides = [20000, 10000, 5000, 2500, 1250, 625, 313]  # halved until one 512 px tile holds it
    tiles_per_side = [-(-side // 2048) for side in sides]  # ceil
    assert read["reads"] == sum(n * n for n in tiles_per_side)
    assert read["growth_mb"] < 150, read  # level 0 as RGB would be 1200 MB
