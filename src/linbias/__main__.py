"""``python -m linbias`` (also what ``torchrun -m linbias train ...`` runs)."""

import sys

from linbias.cli import main

sys.exit(main())
