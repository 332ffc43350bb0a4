"""Image files the application writes and reads: samples and density plots of a run (``plots``),
inpainting grids and mask images (``inpainting``), PNG / JPEG files from tensors (``picture``)."""
