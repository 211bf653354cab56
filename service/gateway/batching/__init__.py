"""Scheduling: the pure batching policy, the bounded queue, the async batcher."""
