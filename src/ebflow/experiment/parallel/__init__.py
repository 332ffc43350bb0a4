"""Where a run computes: the device of a process (``devices``), the process group of a data-parallel
run (``process_group``) and gradient averaging across its processes (``gradient_sync``)."""
