# cython: language_level=3
"""Smooth weighted round robin over egress sources: the compiled twin of _select_py."""

cimport cython
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.string cimport memset

import operator

__all__ = ["SmoothSelector", "SourceMask"]

# Keep equal to the limit of _select_py.
cdef long long _MAX_WEIGHT = 0xFFFFFFFF


cdef inline int _check_index(Py_ssize_t index, Py_ssize_t size) except -1:
    if index < 0 or index >= size:
        raise IndexError(f"source index {index} out of range 0..{size - 1}")
    return 0


cdef void* _alloc(Py_ssize_t count, size_t itemsize) except NULL:
    # One spare slot so that an empty selector or mask still owns a valid pointer.
    cdef void* p = PyMem_Malloc(<size_t>(count + 1) * itemsize)
    if p == NULL:
        raise MemoryError()
    memset(p, 0, <size_t>(count + 1) * itemsize)
    return p


@cython.final
cdef class SourceMask:
    """Eligibility of every source by global index, shared by all selectors."""

    cdef unsigned char* _flags
    cdef Py_ssize_t _size

    def __cinit__(self, size):
        cdef Py_ssize_t n = operator.index(size)
        if n < 0:
            raise ValueError(f"mask size must be >= 0, not {n}")
        self._flags = <unsigned char*>_alloc(n, 1)
        memset(self._flags, 1, <size_t>n)
        self._size = n

    def __dealloc__(self):
        PyMem_Free(self._flags)

    def set(self, Py_ssize_t index, eligible):
        """Mark source `index` eligible or not."""
        _check_index(index, self._size)
        self._flags[index] = 1 if eligible else 0

    def get(self, Py_ssize_t index):
        """Return whether source `index` is eligible."""
        _check_index(index, self._size)
        return self._flags[index] != 0

    def __len__(self):
        """Return the number of sources the mask covers."""
        return self._size

    def __repr__(self):
        cdef Py_ssize_t i, on = 0
        for i in range(self._size):
            on += self._flags[i]
        return f"<SourceMask size={self._size} eligible={on}>"


@cython.final
cdef class SmoothSelector:
    """Smooth weighted round robin over some sources of a SourceMask (one per pool)."""

    cdef SourceMask _mask
    cdef tuple _sources
    cdef tuple _weights
    # Live entries (weight > 0) in entry order, since weight 0 never wins: global index,
    # weight and score, as C arrays so that pick() runs without touching Python objects.
    cdef Py_ssize_t _nlive
    cdef Py_ssize_t* _src
    cdef long long* _w
    cdef long long* _score

    def __cinit__(self, sources, weights, mask):
        if not isinstance(mask, SourceMask):
            raise TypeError(f"mask must be a SourceMask, not {type(mask).__name__}")
        cdef tuple srcs = tuple([operator.index(s) for s in sources])
        cdef tuple wts = tuple([operator.index(w) for w in weights])
        if len(srcs) != len(wts):
            raise ValueError(f"{len(srcs)} sources but {len(wts)} weights")
        cdef SourceMask m = <SourceMask>mask
        cdef set seen = set()
        for s in srcs:
            if s < 0 or s >= m._size:
                raise IndexError(f"source index {s} out of range 0..{m._size - 1}")
            if s in seen:
                raise ValueError(f"source index {s} appears twice")
            seen.add(s)
        for w in wts:
            if w < 0 or w > _MAX_WEIGHT:
                raise ValueError(f"weight must be in 0..{_MAX_WEIGHT}, not {w}")
        self._mask = m
        self._sources = srcs
        self._weights = wts
        cdef Py_ssize_t i, k = 0, n = len(srcs)
        self._src = <Py_ssize_t*>_alloc(n, sizeof(Py_ssize_t))
        self._w = <long long*>_alloc(n, sizeof(long long))
        self._score = <long long*>_alloc(n, sizeof(long long))
        for i in range(n):
            if wts[i] > 0:
                self._src[k] = srcs[i]
                self._w[k] = wts[i]
                k += 1
        self._nlive = k

    def __dealloc__(self):
        PyMem_Free(self._src)
        PyMem_Free(self._w)
        PyMem_Free(self._score)

    def pick(self):
        """Return the next source index, or -1 (state unchanged) when none is eligible."""
        cdef const unsigned char* flags = self._mask._flags
        cdef const Py_ssize_t* src = self._src
        cdef const long long* w = self._w
        cdef long long* score = self._score
        cdef Py_ssize_t k, best = -1
        cdef long long s, best_score = 0, total = 0
        for k in range(self._nlive):
            if flags[src[k]]:
                s = score[k] + w[k]
                score[k] = s
                total += w[k]
                # Strictly greater: on a tie the earliest entry keeps the win.
                if best < 0 or s > best_score:
                    best = k
                    best_score = s
        if best < 0:
            return -1
        score[best] -= total
        return src[best]

    @property
    def sources(self):
        """Return the global source indices, in entry order."""
        return self._sources

    @property
    def weights(self):
        """Return the weights, in entry order."""
        return self._weights

    def __repr__(self):
        return f"<SmoothSelector sources={self._sources} weights={self._weights}>"
