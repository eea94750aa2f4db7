"""`python -m rungate` runs the command line."""

import sys

from rungate.cli import main

sys.exit(main())
