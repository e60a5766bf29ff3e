"""``python -m tigertunnel`` runs the console script."""

import sys

from tigertunnel.cli import main

sys.exit(main())
