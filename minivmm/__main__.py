"""`python -m minivmm`: the same command line as `minivmm`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
