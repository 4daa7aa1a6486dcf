"""Policies. Each family is a package here (`oft`: SimpleVLA-OFT) behind the interface of
`vlajax.model.family`; `layers`, `vit` and `tokenizer` are the building blocks they share.
"""
