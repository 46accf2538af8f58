"""``python -m tune_jobs`` = the ``tunefleet`` command."""

import sys

from tune_jobs.cli import main

sys.exit(main())
