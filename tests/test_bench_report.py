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


def test_a_full_run_of_some_modules_replaces_their_sections_and_keeps_the_others():
    from benchmarks.run import docs_page

    modules = ["bench_io", "bench_read", "bench_speed"]
    first = docs_page({"machine": "machine A", "quick": False, "started": "Mon",
                       "results": {"bench_read": RESULT, "bench_speed": RESULT}}, "", modules)
    assert first.count("machine A") == 2 and "Not run at full size yet" in first
    changed = {**RESULT, "rows": [["resnet34", 2.0, 1.0, "9", 0.5]]}
    second = docs_page({"machine": "machine B", "quick": False, "started": "Tue",
                        "results": {"bench_speed": changed}}, first, modules)
    io, read, speed = second.split("<!-- benchmark: ")[1:]
    assert io.startswith("bench_io") and "Not run at full size yet" in io
    assert "machine A" in read and "resnet18" in read and "Mon" in read
    assert "machine B" in speed and "resnet34" in speed and "resnet18" not in speed
    assert docs_page({"machine": "m", "quick": False, "started": "Wed", "results": {}},
                     second, modules) == second  # nothing ran: the page is unchanged
