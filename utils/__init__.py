"""The EDGE library, in sub-packages by role (arrows point down only):

`stages` (training loop, sampling, captioning) -> `models` (SD, encoders, scorers, retrieval model) ->
`method` (losses, x0 estimate, latent scaling, trainable sets) -> `common` (errors, atomic I/O, seeding, recipes).
`dataset/` imports only `utils.common`; `evaluation/` imports all of them; nothing here imports a script.
"""
