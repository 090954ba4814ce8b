"""`python -m emulator` is the `qnetem` command (see `emulator.cli`)."""

import sys

from emulator.cli import main

sys.exit(main())
