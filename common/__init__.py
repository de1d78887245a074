"""Shared plumbing of every program, one module per concern (README, "Code map"). Nothing here knows about
distillation."""
