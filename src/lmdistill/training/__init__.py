"""The training loop and what a run needs around it: guards, health, checkpoints, the run directory."""
