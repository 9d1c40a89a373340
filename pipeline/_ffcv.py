"""Import FFCV 1.0.2 without its 7-12 s start-up cost (measured on the 2-core machine), and open loaders fast.

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

import numba  # noqa: E402
import numpy as np  # noqa: E402
from ffcv.memory_managers.os_cache import OSCacheManager  # noqa: E402
from ffcv.pipeline.compiler import Compiler  # noqa: E402


@numba.njit(
    numba.uint8[::1](numba.uint64, OSCacheManager.state_type.fget(None)),
    cache=True,
    fastmath=True,
    nogil=True,
    error_model="numpy",
)
def _read(address, mem_state):
    size = mem_state[2][np.searchsorted(mem_state[1], address)]
    return mem_state[0][address : address + size]


# FFCV 1.0.2 compiles this same reader anew for every Loader (about 1.8 s each here); compiled once, cached on
# disk (numba's cache: NUMBA_CACHE_DIR, else __pycache__), it costs milliseconds. Its body is FFCV's.
OSCacheManager.compile_reader = lambda self: _read


def _set_decoding_threads(cls, n: int) -> None:
    """FFCV 1.0.2's Compiler.set_num_threads, less its `torch.set_num_threads(n)`: every Loader calls it (at
    construction and every epoch) with its decoding thread count, so torch's intra-op threads, and with them the
    rounding of CPU training (oneDNN and ATen split reductions by thread), would follow `loader_workers`. Torch's
    threads are the run's own setting (`training.torch_threads`, set by `pipeline.runtime.on_device`)."""
    assert n >= 1, f"{n} decoding threads: pipeline.loaders resolves -1 before FFCV sees it"
    cls.num_threads = n
    numba.set_num_threads(n)


Compiler.set_num_threads = classmethod(_set_decoding_threads)
