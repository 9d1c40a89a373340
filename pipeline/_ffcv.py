"""Import FFCV 1.0.2 without its 7-12 s start-up cost (measured on the 2-core machine).

`ffcv.fields.rgb_image` builds its two-entry IMAGE_MODES table as a numba typed Dict, which compiles
numba's dict implementation at every import, yet only Python code reads the table. With
`numba.typed.Dict` swapped for `dict` during the import, the table is a plain dict. Nothing else in
FFCV 1.0.2 uses a typed Dict (memory_managers/base.py imports the name and never uses it). Every
stage process imports FFCV, so this saves seconds per stage. Import FFCV through this module.
"""

import numba.typed

_typed_dict = numba.typed.Dict
numba.typed.Dict = dict
try:
    import ffcv  # noqa: F401
finally:
    numba.typed.Dict = _typed_dict
