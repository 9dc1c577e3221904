"""`python -m sstream` runs the command-line interface (also what `torchrun -m sstream` uses)."""

from sstream.cli import main

main()
