"""Library for reproducing "Projection Head is Secretly an Information Bottleneck" (ICLR 2025).

Importable and testable with plain arrays and tensors: it knows nothing of files given on a command
line, of the CLI or of DVC (that is `stages/`).
"""
