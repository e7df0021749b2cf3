"""dinopre: DINO / iBOT pretraining of small Vision Transformers on face and hand crops.

Importing the package is cheap (no torch): heavy modules are imported where they are used.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
