"""``python -m idrecog.cli`` runs the ``idrecog`` command."""

import sys

from idrecog.cli import main

sys.exit(main())
