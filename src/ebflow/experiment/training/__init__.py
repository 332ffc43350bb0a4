"""Training: the optimisation step (``step``), the counters and ends of a run (``state``), the
training loop (``loop``: ``Trainer``) and one whole run from config to results (``run``: ``train``)."""
