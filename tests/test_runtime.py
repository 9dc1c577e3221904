"""`compact_cpu_memory`: freed tensors leave the resident set (glibc), unlike by default."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

_FRAGMENT = textwrap.dedent("""
    import sys
    import torch
    from sstream.runtime import compact_cpu_memory

    def resident():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

    if sys.argv[1] == "compact":
        assert compact_cpu_memory()
    torch.ones(2**21)  # 8 MiB, freed at once: glibc's threshold rises above the blocks below
    before = resident()
    blocks = [torch.ones(2**20) for _ in range(64)]  # 4 MiB each
    del blocks[::2]  # every other one freed: holes between live blocks, as tiles leave them
    print((resident() - before) / (32 * 2**22))  # resident growth / live bytes
""")


def _resident_per_live_byte(allocator: str) -> float:
    out = subprocess.run([sys.executable, "-c", _FRAGMENT, allocator], capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_compact_memory_returns_freed_blocks_that_the_default_keeps():
    assert _resident_per_live_byte("default") > 1.8  # the heap keeps the holes
    assert _resident_per_live_byte("compact") < 1.1


def test_the_cli_option_applies_it(monkeypatch):
    from typer.testing import CliRunner

    import sstream.runtime
    from sstream.cli import app

    calls = []
    monkeypatch.setattr(sstream.runtime, "compact_cpu_memory", lambda: calls.append(1) or True)
    result = CliRunner().invoke(app, ["--compact-memory", "estimate-memory", "--size", "64",
                                      "--model", "tiny"])
    assert result.exit_code == 0, result.output
    assert calls == [1]
