"""Checkpoint interoperability with other libraries."""
