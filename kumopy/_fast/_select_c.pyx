# cython: language_level=3
"""Smooth weighted round robin over egress sources: the compiled twin of _select_py."""

cimport cython
from cpython.buffer cimport PyBUF_FORMAT, PyBUF_STRIDES, PyBuffer_Release, PyObject_GetBuffer
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.limits cimport INT_MAX, INT_MIN, LLONG_MIN
from libc.string cimport memcmp, memcpy, memset

import operator

cdef extern from *:
    """
    /* One smooth-WRR pick on 32-bit scores. Plain C with restrict so that gcc vectorizes the
       add-and-max pass (SSE2 is enough); the winner is the first entry holding the max. */
    static inline Py_ssize_t kumopy_step32(int *restrict s, const int *restrict w,
                                           Py_ssize_t m, int total) {
        int top = INT_MIN;
        Py_ssize_t j;
        for (j = 0; j < m; j++) {
            int x = s[j] + w[j];
            s[j] = x;
            if (x > top) top = x;
        }
        j = 0;
        while (s[j] != top) j++;
        s[j] -= total;
        return j;
    }
    """
    Py_ssize_t kumopy_step32(int* s, const int* w, Py_ssize_t m, int total) noexcept nogil

__all__ = ["SmoothSelector", "SourceMask"]

# Keep these equal to the limits of _select_py.
cdef long long _MAX_WEIGHT = 0xFFFFFFFF
cdef Py_ssize_t _MAX_SOURCES = 0x7FFFFFFF
# Longest cycle a selector records for replay (4 bytes a pick); larger weight sums just compute.
cdef long long _CYCLE_CAP = 32768
# Batched picks run on 32-bit scores, checked every _CHUNK picks: a score moves by at most the
# weight total per pick, so the check proves the next chunk cannot overflow.
cdef Py_ssize_t _CHUNK = 256


cdef inline int _check_index(Py_ssize_t index, Py_ssize_t size) except -1:
    if index < 0 or index >= size:
        raise IndexError(f"source index {index} out of range 0..{size - 1}")
    return 0


cdef inline long long _gcd(long long a, long long b) noexcept:
    while b:
        a, b = b, a % b
    return a


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
    # Bumped on every real change so that selectors know when to rebuild their eligible set.
    cdef unsigned long long _version

    def __cinit__(self, size):
        cdef Py_ssize_t n = operator.index(size)
        if n < 0 or n > _MAX_SOURCES:
            raise ValueError(f"mask size must be in 0..{_MAX_SOURCES}, not {n}")
        self._flags = <unsigned char*>_alloc(n, 1)
        memset(self._flags, 1, <size_t>n)
        self._size = n
        self._version = 0

    def __dealloc__(self):
        PyMem_Free(self._flags)

    def set(self, Py_ssize_t index, eligible):
        """Mark source `index` eligible or not."""
        _check_index(index, self._size)
        cdef unsigned char flag = 1 if eligible else 0
        if self._flags[index] != flag:
            self._flags[index] = flag
            self._version += 1

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
    # Live entries (weight > 0), in entry order: global index, weight and score.
    cdef Py_ssize_t _nlive
    cdef Py_ssize_t* _lsrc
    cdef long long* _lw
    cdef long long* _lscore
    # The eligible live entries, packed so that the pick loop reads three dense arrays.
    # _dscore is the authoritative score of an eligible entry until the next _sync().
    cdef Py_ssize_t _m
    cdef Py_ssize_t* _dpos
    cdef int* _dsrc
    cdef long long* _dw
    cdef long long* _dscore
    cdef long long _total
    cdef unsigned long long _seen
    # Cycle replay. With a fixed eligible set, once the scores come back to a state seen
    # sum(weights) picks earlier, the picks repeat with that period: they are recorded (as
    # packed indices) and replayed without touching the scores, which _leave_cycle() rebuilds
    # from _snap, the scores at the start of the cycle, when the eligible set changes.
    cdef long long* _snap
    cdef int* _cyc
    cdef Py_ssize_t _cyc_cap
    cdef Py_ssize_t _cyc_len
    cdef Py_ssize_t _cyc_pos
    cdef Py_ssize_t _rec

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
        cdef Py_ssize_t n = len(srcs)
        self._lsrc = <Py_ssize_t*>_alloc(n, sizeof(Py_ssize_t))
        self._lw = <long long*>_alloc(n, sizeof(long long))
        self._lscore = <long long*>_alloc(n, sizeof(long long))
        self._dpos = <Py_ssize_t*>_alloc(n, sizeof(Py_ssize_t))
        self._dsrc = <int*>_alloc(n, sizeof(int))
        self._dw = <long long*>_alloc(n, sizeof(long long))
        self._dscore = <long long*>_alloc(n, sizeof(long long))
        self._snap = <long long*>_alloc(n, sizeof(long long))
        cdef Py_ssize_t i, k = 0
        cdef long long live_total = 0, unit = 0
        for i in range(n):
            if wts[i] > 0:
                self._lsrc[k] = srcs[i]
                self._lw[k] = wts[i]
                unit = _gcd(unit, self._lw[k])
                k += 1
        self._nlive = k
        # Every score is a multiple of the weights' gcd, so dividing it out picks the same
        # sources and shortens the cycle (weights 100/200/300 replay like 1/2/3).
        for i in range(k):
            self._lw[i] //= unit
            live_total += self._lw[i]
        self._cyc_cap = <Py_ssize_t>min(live_total, _CYCLE_CAP)
        self._cyc = <int*>_alloc(self._cyc_cap, sizeof(int))
        self._cyc_len = 0
        self._m = 0
        self._sync()

    def __dealloc__(self):
        PyMem_Free(self._lsrc)
        PyMem_Free(self._lw)
        PyMem_Free(self._lscore)
        PyMem_Free(self._dpos)
        PyMem_Free(self._dsrc)
        PyMem_Free(self._dw)
        PyMem_Free(self._dscore)
        PyMem_Free(self._snap)
        PyMem_Free(self._cyc)

    cdef void _checkpoint(self) noexcept:
        self._rec = 0
        memcpy(self._snap, self._dscore, <size_t>self._m * sizeof(long long))

    cdef void _leave_cycle(self) noexcept:
        # The scores after `pos` replayed picks: each eligible entry gained its weight `pos`
        # times and lost the total once per win.
        cdef Py_ssize_t j, pos = self._cyc_pos
        if self._cyc_len == 0:
            return
        for j in range(self._m):
            self._dscore[j] = self._snap[j] + pos * self._dw[j]
        for j in range(pos):
            self._dscore[self._cyc[j]] -= self._total
        self._cyc_len = 0

    cdef void _sync(self) noexcept:
        # Frozen scores go back to the live arrays; the new eligible set is packed again.
        cdef Py_ssize_t j, k, m = 0
        self._leave_cycle()
        cdef long long total = 0
        cdef unsigned char* flags = self._mask._flags
        for j in range(self._m):
            self._lscore[self._dpos[j]] = self._dscore[j]
        for k in range(self._nlive):
            if flags[self._lsrc[k]]:
                self._dpos[m] = k
                self._dsrc[m] = <int>self._lsrc[k]
                self._dw[m] = self._lw[k]
                self._dscore[m] = self._lscore[k]
                total += self._lw[k]
                m += 1
        self._m = m
        self._total = total
        self._seen = self._mask._version
        self._checkpoint()

    cdef inline Py_ssize_t _step(self) noexcept:
        # One pick by the scores; return the packed index of the winner. Caller guarantees
        # _m > 0, a synced eligible set and no cycle being replayed.
        cdef long long* score = self._dscore
        cdef const long long* w = self._dw
        cdef Py_ssize_t m = self._m, j, best = 0
        cdef Py_ssize_t b0 = 0, b1 = 0, b2 = 0, b3 = 0
        cdef long long s, top = LLONG_MIN, t0 = LLONG_MIN, t1 = LLONG_MIN
        cdef long long t2 = LLONG_MIN, t3 = LLONG_MIN
        # Four independent running maxima keep the CPU busy; strictly greater keeps, in each
        # lane and then across lanes, the earliest entry on a tie.
        j = 0
        while j + 4 <= m:
            s = score[j] + w[j]
            score[j] = s
            if s > t0:
                t0 = s
                b0 = j
            s = score[j + 1] + w[j + 1]
            score[j + 1] = s
            if s > t1:
                t1 = s
                b1 = j + 1
            s = score[j + 2] + w[j + 2]
            score[j + 2] = s
            if s > t2:
                t2 = s
                b2 = j + 2
            s = score[j + 3] + w[j + 3]
            score[j + 3] = s
            if s > t3:
                t3 = s
                b3 = j + 3
            j += 4
        while j < m:
            s = score[j] + w[j]
            score[j] = s
            if s > top:
                top = s
                best = j
            j += 1
        if t0 > top or (t0 == top and b0 < best):
            top = t0
            best = b0
        if t1 > top or (t1 == top and b1 < best):
            top = t1
            best = b1
        if t2 > top or (t2 == top and b2 < best):
            top = t2
            best = b2
        if t3 > top or (t3 == top and b3 < best):
            top = t3
            best = b3
        score[best] -= self._total
        return best

    cdef inline Py_ssize_t _next(self) noexcept:
        # One pick, replayed or computed (and then recorded); return the packed index.
        cdef Py_ssize_t j
        if self._cyc_len:
            j = self._cyc[self._cyc_pos]
            self._cyc_pos += 1
            if self._cyc_pos == self._cyc_len:
                self._cyc_pos = 0
            return j
        j = self._step()
        if self._total <= self._cyc_cap:
            self._cyc[self._rec] = <int>j
            self._rec += 1
            if self._rec == self._total:
                if memcmp(self._snap, self._dscore, <size_t>self._m * sizeof(long long)) == 0:
                    self._cyc_len = self._rec
                    self._cyc_pos = 0
                else:
                    self._checkpoint()
        return j

    def pick(self):
        """Return the next source index, or -1 (state unchanged) when none is eligible."""
        if self._mask._version != self._seen:
            self._sync()
        if self._m == 0:
            return -1
        return self._dsrc[self._next()]

    cdef void _fill(self, int* out, Py_ssize_t n) noexcept:
        # Caller guarantees _m > 0 and a synced eligible set.
        cdef Py_ssize_t i = 0, pos, length
        cdef const int* cyc = self._cyc
        cdef const int* src = self._dsrc
        while i < n:
            if self._cyc_len:
                pos = self._cyc_pos
                length = self._cyc_len
                while i < n:
                    out[i] = src[cyc[pos]]
                    i += 1
                    pos += 1
                    if pos == length:
                        pos = 0
                self._cyc_pos = pos
            elif self._total > self._cyc_cap and self._m >= 32:
                # Nothing to record or replay: compute the rest in one batch (on larger pools,
                # where the vectorized pass beats the four-lane scalar one; measured).
                i += self._fill32(out + i, n - i)
                while i < n:
                    out[i] = src[self._next()]
                    i += 1
            else:
                out[i] = src[self._next()]
                i += 1

    cdef Py_ssize_t _fill32(self, int* out, Py_ssize_t n) noexcept:
        # Computed picks on 32-bit copies of the scores: the max-reduction then vectorizes.
        # Returns how many picks were written; stops where 32 bits could overflow.
        cdef Py_ssize_t m = self._m, i = 0, j, k, chunk
        cdef long long total = self._total, lo, hi, v, reach
        cdef const int* src = self._dsrc
        cdef int* s32
        cdef int* w32
        cdef int t32
        if total >= INT_MAX // (2 * _CHUNK):
            return 0
        s32 = <int*>PyMem_Malloc(<size_t>(2 * m) * sizeof(int))
        if s32 == NULL:
            return 0
        w32 = s32 + m
        for j in range(m):
            s32[j] = <int>self._dscore[j] if -INT_MAX < self._dscore[j] < INT_MAX else 0
            w32[j] = <int>self._dw[j]
        t32 = <int>total
        while i < n:
            chunk = min(_CHUNK, n - i)
            reach = chunk * total
            lo = hi = 0
            for j in range(m):
                v = self._dscore[j] if i == 0 else s32[j]
                if v < lo:
                    lo = v
                if v > hi:
                    hi = v
            if hi + reach >= INT_MAX or lo - reach <= INT_MIN:
                break
            for k in range(chunk):
                out[i] = src[kumopy_step32(s32, w32, m, t32)]
                i += 1
        if i:
            for j in range(m):
                self._dscore[j] = s32[j]
        PyMem_Free(s32)
        return i

    def pick_many(self, Py_ssize_t n):
        """Return up to `n` picks, fewer when no source is eligible."""
        if n < 0:
            raise ValueError(f"n must be >= 0, not {n}")
        if self._mask._version != self._seen:
            self._sync()
        if self._m == 0:
            return []
        cdef list out = [None] * n
        cdef Py_ssize_t i
        for i in range(n):
            out[i] = self._dsrc[self._next()]
        return out

    def pick_into(self, out, Py_ssize_t n):
        """Write up to `n` picks into the int32 buffer `out`; return how many were written."""
        cdef Py_buffer view
        cdef Py_ssize_t written
        PyObject_GetBuffer(out, &view, PyBUF_FORMAT | PyBUF_STRIDES)
        try:
            if (
                view.readonly
                or view.ndim != 1
                or not _is_int_format(view.format)
                or view.itemsize != 4
                or view.strides[0] != 4
            ):
                raise TypeError("out must be a writable contiguous buffer of C int (array('i'))")
            if n < 0 or n > view.shape[0]:
                raise ValueError(f"n must be in 0..{view.shape[0]}, not {n}")
            if self._mask._version != self._seen:
                self._sync()
            written = 0
            if self._m:
                self._fill(<int*>view.buf, n)
                written = n
        finally:
            PyBuffer_Release(&view)
        return written

    def reset(self):
        """Set every score back to 0."""
        self._cyc_len = 0
        memset(self._lscore, 0, <size_t>self._nlive * sizeof(long long))
        memset(self._dscore, 0, <size_t>self._m * sizeof(long long))
        self._checkpoint()

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


cdef inline bint _is_int_format(const char* fmt) noexcept:
    if fmt == NULL:
        return False
    if fmt[0] == b"@":
        fmt += 1
    return fmt[0] == b"i" and fmt[1] == 0
