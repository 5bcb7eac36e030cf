"""Shared kit used by every trainer: run setup, checkpoints, schedules, metrics."""
