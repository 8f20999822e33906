"""`python -m daemon` is `inferd`."""

import sys

from daemon.cli import main

sys.exit(main())
