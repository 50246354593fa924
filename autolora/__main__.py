"""``python -m autolora``: the ``autolora`` command."""

import sys

from autolora.run.cli import main

sys.exit(main())
