"""``python -m edgec.driver.cli``: the ``edgec`` command."""

import sys

from edgec.driver.cli import main

sys.exit(main())
