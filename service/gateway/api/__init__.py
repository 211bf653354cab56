"""HTTP layer: routes, schemas, probes."""
