"""The trainer shared by every recipe and what it needs: distributed set-up, checkpoints, logs, profiling, export."""
