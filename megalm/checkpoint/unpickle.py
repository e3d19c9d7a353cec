"""Reading checkpoint files without running code from them.

`torch.load(weights_only=True)` unpickles only tensors, containers and primitives, plus the
classes allowed here: the numpy arrays of the trainer's saved RNG states, and whatever the caller
adds (megalm.engine.layout adds the few records DeepSpeed pickles). A file naming anything else (a
pickle that would call `os.system`, say) is refused before any object is built, with one line
naming the file and the global.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from megalm.errors import UserError


Allow = Sequence[Any]  # classes and functions a file may name beyond the base allowlist


def _allowlist(extra: Allow = ()) -> list[Any]:
    reconstruct = getattr(getattr(np, "_core", np.core), "multiarray")._reconstruct
    dtypes = [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.float32)]
    return [reconstruct, np.ndarray, np.dtype, *dtypes, *extra]


def _allowed_names(allow: list[Any]) -> set[str]:
    return {f"{obj.__module__}.{obj.__qualname__}" for obj in allow}


def check_file(path: str, allow: Allow = ()) -> None:
    """Refuse (UserError naming `path`) a file whose pickle names a global outside the allowlist
    (the base one plus `allow`).

    Reads only the pickle's opcodes, never builds an object: a gate for code (DeepSpeed's own
    loaders) that unpickles with weights_only=False."""
    names_allowed = _allowed_names(_allowlist(allow))
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:  # not a torch file, truncated, ...
        raise UserError(f"{path}: not a readable checkpoint file ({type(exc).__name__}: {exc})") from None
    refused = sorted(n for n in names if n not in names_allowed and not _numpy_alias(n, names_allowed))
    if refused:
        raise UserError(f"{path}: refusing to load: it would run or build {', '.join(refused)} (only tensors, "
                        f"containers and the records of the training engine are allowed in a checkpoint)")


def _numpy_alias(name: str, allow: set[str]) -> bool:
    # numpy 2 pickles under `numpy._core`, numpy 1 under `numpy.core`: the same objects.
    return name.replace("numpy.core.", "numpy._core.") in allow or name.replace("numpy._core.", "numpy.core.") in allow


def check_dir(root: str, allow: Allow = ()) -> None:
    """check_file on every *.pt file under `root`."""
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            if name.endswith(".pt"):
                check_file(os.path.join(dirpath, name), allow)


def safe_load(path: str, map_location: Any = "cpu", mmap: bool = False, allow: Allow = ()) -> Any:
    """torch.load that builds only allowlisted objects (the base list plus `allow`); UserError
    naming the file otherwise.

    `mmap`: tensors stay in the file's pages until touched (export reads tensor by tensor)."""
    check_file(path, allow)
    with torch.serialization.safe_globals(_allowlist(allow)):
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except Exception as exc:  # pickle.UnpicklingError from the weights-only unpickler, mostly
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{path}: refusing to load: {first}") from None
