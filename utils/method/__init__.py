"""The EDGE method as pure functions: losses, the x0 estimate, SD's latent scaling, the trainable parameter sets.

May import `utils.common` and model libraries (torch, diffusers, peft, open_clip); never the stage apps,
`dataset/`, `evaluation/` or the scripts.
"""
