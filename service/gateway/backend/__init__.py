"""Compute: the backend protocol, the Triton adapter, the fake backend."""
