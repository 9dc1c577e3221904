"""`python -m sstream` runs the command-line interface (also what `torchrun -m sstream` uses)."""

from sstream.cli import main

if __name__ == "__main__":  # not in a worker process that re-imports the main module
    main()
