"""Simulation and development tooling, apart from the product: the seeded Kite market model
(``market``), the Kite-protocol WebSocket server (``server``), order lifecycles (``orders``),
and the private PostgreSQL clusters the demo and the fault tests use (``devdb``)."""
