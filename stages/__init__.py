"""The pipeline's stages: thin Typer commands that parse, load params, call `pipeline`, write outputs.

Commands import the library modules that pull in torch and FFCV (≈15 s of imports and compilation)
inside their bodies, so `--help` and `check-params` answer at once.
"""
