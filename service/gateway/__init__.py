"""The online gateway (needs the `serve` extra; never imports service.modelprep)."""
