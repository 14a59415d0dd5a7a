"""`python -m kdviz ...` (as torchrun and accelerate launch start it): the `kdviz` command line."""

import sys

from kdviz.cli import main

sys.exit(main())
