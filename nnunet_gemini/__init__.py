"""nnunet-gemini: GEMINI (He et al., IEEE TPAMI 2025) inside nnU-Net v2.

Import is cheap on purpose: nnU-Net imports our trainer shims during every trainer search,
and the .pth hook locates this package at interpreter start. Heavy modules are imported
where they are used.
"""
__version__ = "0.1.0"
