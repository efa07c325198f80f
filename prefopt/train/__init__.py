"""Training: the loop (loop.py), checkpoints (checkpoint.py), metrics (metrics.py)."""
