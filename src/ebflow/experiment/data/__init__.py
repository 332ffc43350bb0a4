"""Data sets (``datasets``: toy and image data, their readers and splits) and the batches a training
step draws from them (``batches``: samplers, dequantisation, augmentation, per-step seeds)."""
