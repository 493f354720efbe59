"""`python -m minivmm`: the same command line as `minivmm`."""
import sys

from .cli import command

if __name__ == "__main__":
    sys.exit(command())
