"""``python -m plinth_sdk.cli``."""

import sys

from plinth_sdk.cli import main

sys.exit(main())
