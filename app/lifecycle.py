"""Process-wide state of `pneumoscan serve` (app/server.py sets it; /readyz, the middleware and
the app's watchers read it)."""

from __future__ import annotations

from collections.abc import Callable

# True from SIGTERM on: /readyz answers 503 `draining`, so load balancers stop routing here
# while the service still answers (PNEUMOSCAN_DRAIN_SECONDS).
draining = False

# Called on SIGHUP (app/server.py): each app's key file watcher registers its wake-up here (the
# TLS certificate reloader is the server's own).
reload_listeners: list[Callable[[], None]] = []
