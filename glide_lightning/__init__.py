"""glide_lightning: train, sample and evaluate small GLIDE-style text-to-image diffusion models."""

__version__ = "0.1.0"
