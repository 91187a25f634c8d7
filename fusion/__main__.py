"""``python -m fusion`` is the ``fusion-tower`` command."""
import sys

from .cli import main

sys.exit(main())
