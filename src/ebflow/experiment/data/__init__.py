"""Data sets and the batches a training step draws from them: ``datasets`` (the loaders by name and
``load_data``), ``splits`` (what a loader returns), ``toys`` (generated points, point files),
``image_sets`` (digits, MNIST, CIFAR-10, stand-ins) and ``batches`` (samplers, dequantisation,
augmentation)."""
