"""Image-classification data: sources, label alignment, the synthetic generator, augmentation records,
normalisation, pre-decoding, views, loaders and samplers (docs/extending.md)."""
