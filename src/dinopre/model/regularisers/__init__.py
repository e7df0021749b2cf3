"""Extra terms of the student's loss, one module each (KoLeo, contrastive, Drloc); `registry` lists them in order.

This package's `__init__` stays empty and torch-free: the terminal output imports `registry` for the loss names.
"""
