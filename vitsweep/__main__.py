"""``python -m vitsweep`` is the ``vitsweep`` command (so ``torchrun -m vitsweep train ...`` works)."""

import sys

from orchestrator.cli import main

if __name__ == "__main__":
    sys.exit(main())
