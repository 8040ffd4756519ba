"""Hot-path counters (plain ints, no locks) and the Prometheus collector over them."""
