"""Run configurations: the keys declared in typed sections (``sections``), their validation into a
``RunConfig`` (``schema``), presets, files and overrides (``resolve``; the YAML presets are in
``presets/``), and the builders from a config's sections to the model, objective and optimizer
(``builders``, whose registries give several keys their choices)."""
