"""`python -m kdviz.cli ...`: the `kdviz` command line."""

import sys

from kdviz.cli import main

sys.exit(main())
