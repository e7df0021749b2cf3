"""dinopre: DINO / iBOT pretraining of small Vision Transformers on face and hand crops.

Importing the package is cheap (no torch): heavy modules are imported where they are used.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load_dinov2_backbone"]


def load_dinov2_backbone(spec: str):  # noqa: ANN201 (the return type lives in a torch module, imported lazily)
    """Load an exported backbone from a `file::PATH[:MODEL]` spec, strictly; see `dinopre.files.export`.

    Returns:
        An `nn.Module` in eval mode whose `forward(x)` gives the (B, D) CLS embedding.
    """
    from dinopre.files.export import load_dinov2_backbone as load

    return load(spec)
