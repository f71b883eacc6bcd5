"""`python -m ecanfnet.cli`, the same as `python -m ecanfnet`."""

import sys

from . import main

sys.exit(main())
