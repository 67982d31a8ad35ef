"""Process-wide shutdown state of `pneumoscan serve` (app/server.py sets it; /readyz and the
middleware read it)."""

from __future__ import annotations

# True from SIGTERM on: /readyz answers 503 `draining`, so load balancers stop routing here
# while the service still answers (PNEUMOSCAN_DRAIN_SECONDS).
draining = False
