"""The four scenarios; each returns Measurement rows and skips what it cannot run."""

from __future__ import annotations

from bench.scenarios import deploy, mirror, scale, startup

#: Scenario name -> module with ``run(ctx) -> List[Measurement]``, in bench order.
SCENARIOS = {"deploy": deploy, "startup": startup, "mirror": mirror, "scale": scale}
