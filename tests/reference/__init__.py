"""Independent PyTorch reference of OpenVLA-OFT (SimpleVLA-OFT) for parity tests.

Torch, timm and transformers are imported only inside this package: the vlajax
runtime never imports torch.
"""
