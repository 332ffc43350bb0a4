"""A run directory: its files written atomically (``files``), checkpoints (``checkpoint``), the run's
ownership of its folder and checkpoints (``ownership``), the metrics log (``metrics``) and loading a
finished run (``load``)."""
