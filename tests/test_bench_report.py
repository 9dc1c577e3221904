"""benchmarks/run.py's output: tables readable when piped, Markdown that keeps every cell."""

from __future__ import annotations

from benchmarks.run import markdown, render, wide_console

RESULT = {"title": "Speed against plain PyTorch", "seconds": 1.5,
          "columns": ["model", "plain PyTorch (images/s)", "streamed, halo engine (images/s)",
                      "peak memory, streamed (MiB)", "ratio streamed / plain"],
          "rows": [["resnet18", 1.234567, 0.98, "275 | 312", 0.79]], "notes": ["a note"]}


def test_piped_tables_are_not_cut(capsys):
    render(RESULT, wide_console())  # pytest's stdout is not a terminal
    printed = capsys.readouterr().out
    for header in RESULT["columns"]:
        assert header in printed, header  # rich would cut headers to 'pla…' at 80 columns
    assert "275 | 312" in printed


def test_markdown_is_dated_and_keeps_every_cell():
    text = markdown({"machine": "test machine", "quick": True, "started": "Fri Dec  4 2026",
                     "results": {"bench_speed": RESULT}})
    assert "Fri Dec  4 2026" in text and "test machine" in text and "quick run" in text
    assert "| resnet18 | 1.23 | 0.98 | 275 \\| 312 | 0.79 |" in text
    assert "## Speed against plain PyTorch" in text and "- a note" in text
