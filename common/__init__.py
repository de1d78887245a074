"""Shared plumbing of every program, one module per concern (docs/extending.md). Nothing here knows about
distillation."""
