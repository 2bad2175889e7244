"""Networks: ImageNet-initialised EfficientNet-Lite backbones, the lesion detector, the classifiers."""
