"""The one restricted unpickler of occbench: pickled files are read as numpy arrays and plain Python values.

A pickle names the functions it calls while loading; an ordinary ``pickle.load`` imports and calls any of
them, so a file can run code. :class:`RestrictedUnpickler` resolves only numpy's array/scalar/dtype
reconstructors and a few inert builtins; any other name is refused with a one-line UserError naming the
file and the class. Readers with more needs subclass it and extend :meth:`RestrictedUnpickler.resolve`
(``occbench.smpl_io``: chumpy and scipy.sparse arrays; ``occbench.checkpoints``: torch's own allow-list).
"""
from __future__ import annotations

import importlib
import io
import os
import pickle

from occbench.errors import UserError

BUILTIN_GLOBALS = {
    ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"), ("copyreg", "__newobj__"),
    ("__builtin__", "object"), ("builtins", "object"), ("__builtin__", "set"), ("builtins", "set"),
    ("__builtin__", "frozenset"), ("builtins", "frozenset"), ("collections", "OrderedDict"),
    ("__builtin__", "slice"), ("builtins", "slice"), ("__builtin__", "complex"), ("builtins", "complex"),
    ("_codecs", "encode"),  # protocol-2 pickles written by Python 3 store bytes this way
}
NUMPY_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                 "numpy._core.numeric")
NUMPY_NAMES = ("_reconstruct", "scalar", "ndarray", "dtype", "_frombuffer")


def _numpy_module(name: str):
    # pickles written by numpy 1 name numpy.core, numpy 2 names numpy._core; either loads on both
    try:
        return importlib.import_module(name.replace("numpy.core", "numpy._core", 1))
    except ModuleNotFoundError:
        return importlib.import_module(name)


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that builds numpy arrays, numpy scalars and builtin containers, nothing else.

    where: the file, named in errors; holds: what such a file should hold (for the error message).
    Keyword arguments go to ``pickle.Unpickler`` (default ``encoding="latin1"``, for Python-2 pickles).
    """

    def __init__(self, file, where: str = "pickle", holds: str = "numpy arrays and plain Python values",
                 **kwargs):
        kwargs.setdefault("encoding", "latin1")
        super().__init__(file, **kwargs)
        self.where = where
        self.holds = holds

    def resolve(self, module: str, name: str):
        """The object a pickled global may name, or None when it is not allowed."""
        if module in NUMPY_MODULES and name in NUMPY_NAMES:
            return getattr(_numpy_module(module), name, None)
        if (module, name) in BUILTIN_GLOBALS:
            return super().find_class(module, name)
        return None

    def find_class(self, module, name):
        found = self.resolve(module, name)
        if found is None:
            raise UserError(f"{self.where}: refusing to load class {module}.{name} from a pickle (such a file holds "
                            f"only {self.holds}; this one would run code): use the original file")
        return found


def load(path_or_file, where: str | None = None, holds: str | None = None):
    """Unpickle a file (path or binary file object) with :class:`RestrictedUnpickler`.

    A refused class is a UserError; a damaged pickle raises what ``pickle`` raises (the caller names the
    file format in its own message).
    """
    kwargs = {} if holds is None else {"holds": holds}
    if isinstance(path_or_file, (str, os.PathLike)):
        with open(path_or_file, "rb") as handle:
            return RestrictedUnpickler(handle, where or str(path_or_file), **kwargs).load()
    return RestrictedUnpickler(path_or_file, where or "pickle", **kwargs).load()


def loads(data: bytes, where: str = "pickle", holds: str | None = None):
    """:func:`load` for bytes."""
    return load(io.BytesIO(data), where, holds)
