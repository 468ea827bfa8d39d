"""Data: the ImageNet layouts and any folder of classes, decoding and transforms, datasets, samplers and
loaders, the demo datasets, augmentations, and the GPU decoding backend. Knows nothing of training."""
