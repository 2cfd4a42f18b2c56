"""The architecture room's error type (its own module, so light modules need not import timm)."""


class ArchitectureError(ValueError):
    """A model configuration that cannot be built (unknown arch, missing weights, modality mismatch)."""
