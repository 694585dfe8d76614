"""``python -m aioidempotency``."""

import sys

from aioidempotency._cli import main

sys.exit(main())
