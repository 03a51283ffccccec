"""``python -m pyro_lpc`` runs the ``pyro-lpc`` command."""
import sys

from .images.cli import main

sys.exit(main())
