"""Merge math (pure tensor functions, no I/O) and the streaming merge engine."""
