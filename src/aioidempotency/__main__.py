"""``python -m aioidempotency``."""

import sys

from aioidempotency.cli import main

sys.exit(main())
