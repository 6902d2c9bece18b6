"""`python -m minillama ...` is the same as the `minillama` command."""
import sys

from .cli import main

sys.exit(main())
