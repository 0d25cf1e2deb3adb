"""Generic helpers every package sits on: CLI errors, atomic file I/O, seeding, recipes/run configs, precision.

May import the standard library and third-party packages only; nothing else of this project (dataset/, the
other utils sub-packages and evaluation/ all import it, so an import from here back into them would be a cycle).
"""
