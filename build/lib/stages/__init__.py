"""The pipeline's stages: thin Typer commands that parse, load params, call `pipeline`, write outputs."""
