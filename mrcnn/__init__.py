"""mrcnn: Mask R-CNN (ResNet-50 + FPN) for TensorFlow 2."""

__version__ = "0.1.0"
