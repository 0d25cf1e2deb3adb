"""The stage apps under the scripts: the training loop, the sampling stage, latent caching, captioning.

May import `utils.common`, `utils.method`, `utils.models` and `dataset/`; never `evaluation/` or the scripts.
"""
