"""Testing idempotent code, and testing a store: helpers, a pytest plugin and a kit.

- `FakeClock`: time that moves only when a test says so (expiry, orphaned claims,
  lease renewals, without sleeping);
- `EventLog`: the engines' decisions during a test, from `aioidempotency.events`, with
  assertions ("ran once", "replayed", "released", "left no claim");
- `orphan_claim`: the claim of a worker that crashed holding a key;
- `key_for`: the idempotency key of a decorated function's call;
- ``aioidempotency.testing.plugin``: the pytest plugin, loaded once the package is
  installed, with fixtures built on the above;
- ``aioidempotency.testing.contract``: the conformance kit for store authors
  (`AsyncStoreContract`, `StoreContract`).

This module imports no test framework; the plugin and the kit need pytest
(``pip install "aioidempotency[testing]"``). See docs/testing.md.
"""

from aioidempotency.testing._clock import FakeClock
from aioidempotency.testing._log import EventLog, key_for, orphan_claim

__all__ = ["EventLog", "FakeClock", "key_for", "orphan_claim"]
