"""A numpy-backed stand-in for CuPy, so that the GPU code paths run (and fail) on a CPU.

:func:`install` puts fake ``cupy``, ``cupy.linalg``, ``cupy.cuda``, ``cupyx``,
``cupyx.scipy``, ``cupyx.scipy.special``, ``cupyx.scipy.linalg`` and
``cupyx.scipy.sparse`` modules into ``sys.modules`` (the ``fake_cupy`` fixture of
``tests/conftest.py`` does it for one test and restores everything after). Their arrays
are :class:`ndarray` objects that hold a numpy array but follow CuPy's rules where a
namespace mistake would show:

- implicit conversion to numpy raises ``TypeError`` (``np.asarray(a)``, ``float`` of a
  non-scalar, pandas, ``scipy.special.gammaln(a)``, ``scipy.linalg.*(a)``,
  ``scipy.sparse.csr_matrix(a)``, indexing a numpy array with one); ``.get()`` and
  ``cupy.asnumpy`` are the ways back to the host, ``cupy.asarray`` the way there;
- a numpy array (of any shape) mixed with a device array in an arithmetic operator, a
  ufunc or a ``cupy.*`` function raises ``TypeError`` (CuPy: "Unsupported type"),
  numpy and Python scalars are accepted; numpy index arrays are accepted in indexing,
  as CuPy copies them; assigning a non-scalar numpy array into a slice raises;
- numpy functions called on device arrays dispatch through ``__array_function__`` to the
  ``cupy`` function of the same name and ufuncs through ``__array_ufunc__`` to the cupy
  ufunc of the same name (scipy.special ufuncs have none: ``TypeError``); ufunc methods
  (``np.add.at``, ``.reduce``) are refused as CuPy's ``__array_ufunc__`` refuses them;
- results are device arrays, reductions and scalar indexing included (0-d arrays, as
  CuPy returns);
- ``cupyx.scipy.sparse`` matrices are :class:`spmatrix` objects over scipy matrices whose
  ``type(...).__module__`` starts with ``cupyx.scipy.sparse``, whose ``data`` /
  ``indices`` / ``indptr`` are device arrays and whose ``.get()`` gives scipy;
  ``scipy.sparse.issparse`` is False for them, as for CuPy's.

What it cannot catch: speed and memory (everything runs in numpy, with a Python-level
wrapper per operation), CUDA kernel bugs, float32/atomics rounding, asynchronous
streams, functions or keyword arguments that exist in numpy but not in CuPy (the
stand-in forwards any ``cupy.<name>`` to ``numpy.<name>``; only the differences listed
in ``_MISSING`` are refused), and CuPy's wrap-around of out-of-bounds indices. A real
GPU run (``asv_bench/gpu_check.py``) is still needed for those.
"""

from __future__ import annotations

import functools
import sys
import types

import numpy as np
import scipy.linalg
import scipy.sparse
import scipy.special

#: numpy spellings CuPy does not accept, refused so that the package keeps avoiding them
_MISSING = {
    # cupy.repeat takes an int or a list of repeats, not a device array of them
    "repeat": lambda args, kwargs: len(args) > 1 and isinstance(args[1], ndarray),
}

_MODULES = (
    "cupy", "cupy.linalg", "cupy.cuda", "cupy.cuda.runtime", "cupyx", "cupyx.scipy",
    "cupyx.scipy.special", "cupyx.scipy.linalg", "cupyx.scipy.sparse",
)


def _host_error(where):
    return TypeError(f"{where}: Unsupported type (a host array mixed with device arrays)")


def _implicit_error():
    return TypeError(
        "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a NumPy array explicitly."
    )


def _unwrap(obj, where):
    """Device objects -> their numpy / scipy payload; host arrays refused."""
    if isinstance(obj, ndarray):
        return obj._a
    if isinstance(obj, spmatrix):
        return obj._m
    if isinstance(obj, (type, np.generic, np.dtype)):
        return obj  # dtypes and numpy scalars are fine
    if isinstance(obj, np.ndarray) or scipy.sparse.issparse(obj) or hasattr(obj, "__array__"):
        raise _host_error(where)  # numpy, scipy.sparse, pandas...: host containers
    if isinstance(obj, (list, tuple)):
        out = [_unwrap(o, where) for o in obj]
        return type(obj)(out) if type(obj) in (list, tuple) else type(obj)(*out)
    if isinstance(obj, dict):
        return {k: _unwrap(v, where) for k, v in obj.items()}
    return obj


def _wrap(obj):
    """numpy results -> device arrays (numpy scalars become 0-d arrays, as in CuPy)."""
    if isinstance(obj, np.ndarray):
        return ndarray(obj)
    if isinstance(obj, np.generic):
        return ndarray(np.asarray(obj))
    if scipy.sparse.issparse(obj):
        return _SPARSE_CLASSES[obj.format](obj)
    if isinstance(obj, tuple):
        out = [_wrap(o) for o in obj]
        return tuple(out) if type(obj) is tuple else type(obj)(*out)
    if isinstance(obj, list):
        return [_wrap(o) for o in obj]
    return obj


def _device_function(fn, where, host_ok=False):
    """``fn`` (numpy / scipy) as a cupy function: device arrays in and out, host arrays refused."""

    @functools.wraps(fn)
    def f(*args, **kwargs):
        if host_ok:
            args = [a._a if isinstance(a, ndarray) else a for a in args]
        else:
            args = _unwrap(list(args), where)
        kwargs = _unwrap(kwargs, where)
        return _wrap(fn(*args, **kwargs))

    return f


class ndarray:
    """A device array of the stand-in (see the module docstring)."""

    __module__ = "cupy"

    __slots__ = ("_a",)
    __array_priority__ = 100
    __hash__ = None

    def __init__(self, a):
        self._a = a

    # -- the way back to the host, and the refusals
    def get(self, stream=None, order="C", out=None):
        if out is not None:
            out[...] = self._a
            return out
        return np.array(self._a, order=order)

    def set(self, arr, stream=None):
        if not isinstance(arr, np.ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        self._a[...] = arr

    def __array__(self, *args, **kwargs):
        raise _implicit_error()

    def __getattr__(self, name):
        # dunder lookups (``__array_interface__``...) and raw buffers would hand numpy the data
        if name.startswith("_") or name in ("data", "ctypes", "tobytes", "tofile", "base"):
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if callable(attr):
            return _device_function(attr, f"cupy.ndarray.{name}")
        return _wrap(attr)

    @property
    def T(self):
        return ndarray(self._a.T)

    @property
    def device(self):
        return _Device(0)

    # -- numpy protocols: dispatch to the stand-in's cupy namespace, as CuPy does
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        cp_ufunc = getattr(cupy, ufunc.__name__, None)
        if method != "__call__" or not isinstance(cp_ufunc, _Ufunc):
            return NotImplemented
        for x in inputs + tuple(kwargs.get("out", ())):
            if not isinstance(x, (ndarray, np.ndarray, np.generic, int, float, complex, bool)):
                return NotImplemented
        if "out" in kwargs:
            kwargs["out"] = kwargs["out"][0] if len(kwargs["out"]) == 1 else kwargs["out"]
        return cp_ufunc(*inputs, **kwargs)

    def __array_function__(self, func, types_, args, kwargs):
        try:
            module = functools.reduce(getattr, func.__module__.split(".")[1:], cupy)
            cp_func = getattr(module, func.__name__)
        except AttributeError:
            return NotImplemented
        if not all(issubclass(t, (ndarray, np.ndarray)) for t in types_):
            return NotImplemented
        return cp_func(*args, **kwargs)

    # -- Python protocols
    def __len__(self):
        return len(self._a)

    def __iter__(self):
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self._a.shape[0]))

    def __getitem__(self, key):
        key = _unwrap_index(key)
        return _wrap(self._a[key])

    def __setitem__(self, key, value):
        key = _unwrap_index(key)
        if isinstance(value, np.ndarray) and value.ndim > 0:
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        self._a[key] = value._a if isinstance(value, ndarray) else value

    def __bool__(self):
        return bool(self._a)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __index__(self):
        return self._a.__index__()

    def __complex__(self):
        return complex(self._a)

    def __repr__(self):
        return "stand-in device " + repr(self._a)

    def __format__(self, spec):
        return format(self._a, spec)

    def __copy__(self):
        return ndarray(self._a.copy())

    def __deepcopy__(self, memo):
        return ndarray(self._a.copy())


def _unwrap_index(key):
    if isinstance(key, tuple):
        return tuple(k._a if isinstance(k, ndarray) else k for k in key)
    return key._a if isinstance(key, ndarray) else key


def _binary(ufunc_name, reflected=False, inplace=False):
    def op(self, other):
        if isinstance(other, spmatrix):
            return NotImplemented  # the sparse matrix's reflected operator does it
        uf = getattr(cupy, ufunc_name)
        if inplace:
            return uf(self, other, out=self)
        return uf(other, self) if reflected else uf(self, other)

    return op


def _unary(ufunc_name):
    def op(self):
        return getattr(cupy, ufunc_name)(self)

    return op


for _name, _uf in [
    ("add", "add"), ("sub", "subtract"), ("mul", "multiply"), ("truediv", "true_divide"),
    ("floordiv", "floor_divide"), ("mod", "remainder"), ("pow", "power"), ("matmul", "matmul"),
    ("and", "bitwise_and"), ("or", "bitwise_or"), ("xor", "bitwise_xor"),
    ("lshift", "left_shift"), ("rshift", "right_shift"),
]:
    setattr(ndarray, f"__{_name}__", _binary(_uf))
    setattr(ndarray, f"__r{_name}__", _binary(_uf, reflected=True))
    setattr(ndarray, f"__i{_name}__", _binary(_uf, inplace=True))
for _name, _uf in [("lt", "less"), ("le", "less_equal"), ("gt", "greater"), ("ge", "greater_equal"),
                   ("eq", "equal"), ("ne", "not_equal")]:
    setattr(ndarray, f"__{_name}__", _binary(_uf))
for _name, _uf in [("neg", "negative"), ("pos", "positive"), ("abs", "absolute"), ("invert", "invert")]:
    setattr(ndarray, f"__{_name}__", _unary(_uf))


class _Ufunc:
    """A cupy ufunc: a numpy ufunc on device arrays (``out=`` device arrays only)."""

    def __init__(self, uf):
        self._uf = uf
        self.__name__ = uf.__name__
        self.nin, self.nout = uf.nin, uf.nout

    def __call__(self, *args, **kwargs):
        where = f"cupy.{self.__name__}"
        for a in args:
            if isinstance(a, np.ndarray):
                raise _host_error(where)
        out = kwargs.get("out")
        if out is not None:
            outs = out if isinstance(out, tuple) else (out,)
            if not all(isinstance(o, ndarray) for o in outs):
                raise TypeError(f"{where}: out must be a cupy.ndarray")
            kwargs["out"] = tuple(o._a for o in outs)
            self._uf(*_unwrap(list(args), where), **kwargs)
            return out
        return _wrap(self._uf(*_unwrap(list(args), where), **_unwrap(kwargs, where)))

    def reduce(self, a, *args, **kwargs):
        return _wrap(self._uf.reduce(_unwrap(a, f"cupy.{self.__name__}.reduce"), *args, **kwargs))


class _Namespace(types.ModuleType):
    """A fake module whose functions forward to a numpy / scipy module through
    :func:`_device_function` (``host_ok``: names that take host data)."""

    def __init__(self, name, source, host_ok=(), extra=None):
        super().__init__(name)
        self._source = source
        self._host_ok = set(host_ok)
        self.__dict__.update(extra or {})

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(self._source, name)  # AttributeError: not in the namespace
        if isinstance(attr, np.ufunc):
            out = _Ufunc(attr)
        elif callable(attr) and not isinstance(attr, type):
            out = _device_function(attr, f"{self.__name__}.{name}", host_ok=name in self._host_ok)
            if name in _MISSING:
                out = _refusing(out, name)
        else:
            out = attr  # dtypes, constants, numpy scalar types (shared with numpy, as in CuPy)
        setattr(self, name, out)
        return out


def _refusing(f, name):
    @functools.wraps(f)
    def g(*args, **kwargs):
        if _MISSING[name](args, kwargs):
            raise TypeError(f"cupy.{name} does not take these arguments (stand-in: CuPy incompatibility)")
        return f(*args, **kwargs)

    return g


def _asarray(a, dtype=None, order=None, **kwargs):
    """Host or device data -> a device array (a copy from the host, as a transfer is)."""
    if isinstance(a, spmatrix):
        raise TypeError("cupy.asarray does not take sparse matrices")
    if isinstance(a, ndarray):
        return ndarray(np.asarray(a._a, dtype=dtype, order=order))
    if isinstance(a, (list, tuple)) and any(isinstance(x, ndarray) for x in a):
        a = [x._a if isinstance(x, ndarray) else x for x in a]
    if hasattr(a, "__array__") or isinstance(a, (list, tuple, int, float, complex, bool, np.generic)):
        return ndarray(np.array(a, dtype=dtype, order=order or "K"))
    raise TypeError(f"cupy.asarray: unsupported input {type(a)}")


def _array(a, dtype=None, copy=True, order="K", **kwargs):
    return _asarray(a, dtype=dtype, order=None if order == "K" else order)


def _asnumpy(a, stream=None, order="C", out=None):
    if isinstance(a, ndarray):
        return a.get(order=order, out=out)
    return np.asarray(a, order=order)


class _Device:
    def __init__(self, id=0):
        self.id = id

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        pass


def _runtime():
    m = types.ModuleType("cupy.cuda.runtime")
    m.getDeviceCount = lambda: 1
    m.getDeviceProperties = lambda i: {"name": b"numpy stand-in for CuPy", "totalGlobalMem": 0}
    m.getDevice = lambda: 0
    m.deviceSynchronize = lambda: None
    return m


# ----------------------------------------------------------------------------- sparse
class spmatrix:
    """A cupyx.scipy.sparse matrix of the stand-in: a scipy matrix behind device arrays."""

    format = None
    __array_priority__ = 101
    __hash__ = None

    def __init__(self, arg1, shape=None, dtype=None, copy=False):
        where = f"cupyx.scipy.sparse.{type(self).__name__}"
        if isinstance(arg1, spmatrix):
            m = arg1._m
        elif scipy.sparse.issparse(arg1):  # a host matrix is copied to the device
            m, copy = arg1, True
        elif isinstance(arg1, ndarray):
            m = arg1._a
        elif isinstance(arg1, tuple):
            m = _unwrap(arg1, where)
        else:
            raise ValueError(f"{where}: unsupported initializer format {type(arg1)}")
        self._m = _SCIPY[self.format](m, shape=shape, dtype=dtype, copy=copy)

    def __array__(self, *args, **kwargs):
        raise _implicit_error()

    def get(self, stream=None):
        return self._m.copy()

    # the arrays: device views of the scipy matrix's (writes go through)
    def _arr(name):
        def fget(self):
            return ndarray(getattr(self._m, name))

        def fset(self, value):
            if not isinstance(value, ndarray):
                raise TypeError(f"{name} must be a cupy.ndarray")
            setattr(self._m, name, value._a)

        return property(fget, fset)

    data, indices, indptr, row, col = _arr("data"), _arr("indices"), _arr("indptr"), _arr("row"), _arr("col")
    del _arr

    shape = property(lambda self: self._m.shape)
    nnz = property(lambda self: self._m.nnz)
    dtype = property(lambda self: self._m.dtype)
    ndim = property(lambda self: 2)
    size = property(lambda self: self._m.nnz)
    has_canonical_format = property(lambda self: self._m.has_canonical_format)
    has_sorted_indices = property(lambda self: self._m.has_sorted_indices)
    T = property(lambda self: _wrap(self._m.T))

    def __getattr__(self, name):
        # methods with device results (tocsr, copy, multiply, toarray, sum, ...)
        if name.startswith("_"):
            raise AttributeError(name)
        attr = getattr(self._m, name)
        if not callable(attr):
            return _wrap(attr)
        where = f"cupyx.scipy.sparse.{type(self).__name__}.{name}"

        def method(*args, **kwargs):
            out = attr(*_unwrap(list(args), where), **_unwrap(kwargs, where))
            if isinstance(out, np.matrix):  # CuPy's reductions give 2-D ndarrays
                out = np.asarray(out)
            return _wrap(out)

        return method

    def __getitem__(self, key):
        return _wrap(self._m[_unwrap_index(key)])

    def _binary(self, other, op):
        if isinstance(other, np.ndarray) or scipy.sparse.issparse(other):
            raise _host_error(f"cupyx.scipy.sparse.{type(self).__name__}.{op}")
        out = getattr(self._m, op)(_unwrap(other, op))
        return _wrap(np.asarray(out) if isinstance(out, np.matrix) else out)

    def __neg__(self):
        return _wrap(-self._m)

    def __repr__(self):
        return f"<stand-in cupyx {self.format} matrix {self.shape}, {self.nnz} stored>"


for _op in ("__matmul__", "__rmatmul__", "__mul__", "__rmul__", "__add__", "__sub__", "__truediv__"):
    setattr(spmatrix, _op, functools.partialmethod(spmatrix._binary, op=_op))
spmatrix.dot = spmatrix.__matmul__


def _sparse_class(fmt, scipy_cls):
    cls = type(f"{fmt}_matrix", (spmatrix,), {"format": fmt, "__module__": f"cupyx.scipy.sparse._{fmt}"})
    _SCIPY[fmt] = scipy_cls
    _SPARSE_CLASSES[fmt] = cls
    return cls


_SCIPY = {}
_SPARSE_CLASSES = {}
csr_matrix = _sparse_class("csr", scipy.sparse.csr_matrix)
csc_matrix = _sparse_class("csc", scipy.sparse.csc_matrix)
coo_matrix = _sparse_class("coo", scipy.sparse.coo_matrix)
spmatrix.__module__ = "cupyx.scipy.sparse._base"


# ----------------------------------------------------------------------------- modules
def _build():
    linalg = _Namespace("cupy.linalg", np.linalg)
    runtime = _runtime()
    cuda = types.ModuleType("cupy.cuda")
    cuda.runtime = runtime
    cuda.Device = _Device
    cp = _Namespace(
        "cupy", np, host_ok=(),
        extra={
            "ndarray": ndarray, "linalg": linalg, "cuda": cuda, "asarray": _asarray, "array": _array,
            "asnumpy": _asnumpy, "asanyarray": _asarray, "get_array_module": lambda *a: sys.modules["cupy"]
            if any(isinstance(x, (ndarray, spmatrix)) for x in a) else np,
            "__version__": "0.0-stand-in", "is_standin": True,
        },
    )
    special = _Namespace("cupyx.scipy.special", scipy.special)
    slinalg = _Namespace("cupyx.scipy.linalg", scipy.linalg)
    sparse = types.ModuleType("cupyx.scipy.sparse")
    sparse.csr_matrix, sparse.csc_matrix, sparse.coo_matrix, sparse.spmatrix = csr_matrix, csc_matrix, coo_matrix, spmatrix
    sparse.issparse = lambda x: isinstance(x, spmatrix)
    sparse.isspmatrix = sparse.issparse
    sparse.isspmatrix_csr = lambda x: isinstance(x, csr_matrix)
    sparse.isspmatrix_csc = lambda x: isinstance(x, csc_matrix)
    sparse.isspmatrix_coo = lambda x: isinstance(x, coo_matrix)
    cscipy = types.ModuleType("cupyx.scipy")
    cscipy.special, cscipy.linalg, cscipy.sparse = special, slinalg, sparse
    cupyx = types.ModuleType("cupyx")
    cupyx.scipy = cscipy
    cupyx.scatter_add = _scatter_add
    return {
        "cupy": cp, "cupy.linalg": linalg, "cupy.cuda": cuda, "cupy.cuda.runtime": runtime, "cupyx": cupyx,
        "cupyx.scipy": cscipy, "cupyx.scipy.special": special, "cupyx.scipy.linalg": slinalg,
        "cupyx.scipy.sparse": sparse,
    }


def _scatter_add(a, slices, value):
    """``cupyx.scatter_add``: ``a[slices] += value`` with repeated indices accumulating."""
    if not isinstance(a, ndarray):
        raise TypeError("cupyx.scatter_add: a must be a cupy.ndarray")
    if isinstance(value, np.ndarray):
        raise _host_error("cupyx.scatter_add")
    np.add.at(a._a, _unwrap_index(slices), value._a if isinstance(value, ndarray) else value)


MODULES = _build()
cupy = MODULES["cupy"]


def install(monkeypatch):
    """Put the stand-in into ``sys.modules`` for the duration of ``monkeypatch``."""
    for name in _MODULES:
        monkeypatch.setitem(sys.modules, name, MODULES[name])
    return cupy
