"""``python -m illume.cli``: the same as the ``illume`` command."""

import sys

from illume.cli import main

sys.exit(main())
