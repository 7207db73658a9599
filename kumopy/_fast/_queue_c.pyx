# cython: language_level=3
"""Due-time ordering and per-source credit accounting: the compiled twin of _queue_py."""

cimport cython
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.math cimport INFINITY, isnan
from libc.string cimport memset

__all__ = ["DueQueue", "Ledger"]


cdef struct _Entry:
    double due
    unsigned long long seq
    long long handle


cdef inline bint _before(const _Entry* a, const _Entry* b) noexcept nogil:
    return a.due < b.due or (a.due == b.due and a.seq < b.seq)


# Below this capacity the heap never shrinks; above it, it halves when a quarter full.
cdef Py_ssize_t _MIN_CAPACITY = 64


@cython.final
cdef class DueQueue:
    """Handles ordered by due time (min-heap), FIFO among equal due times."""

    cdef _Entry* _heap
    cdef Py_ssize_t _size
    cdef Py_ssize_t _cap
    # The sequence number breaks ties between equal due times in push order.
    cdef unsigned long long _seq

    def __cinit__(self):
        self._heap = <_Entry*>PyMem_Malloc(<size_t>_MIN_CAPACITY * sizeof(_Entry))
        if self._heap == NULL:
            raise MemoryError()
        self._cap = _MIN_CAPACITY
        self._size = 0
        self._seq = 0

    def __dealloc__(self):
        PyMem_Free(self._heap)

    cdef int _resize(self, Py_ssize_t cap) except -1:
        cdef _Entry* grown = <_Entry*>PyMem_Realloc(self._heap, <size_t>cap * sizeof(_Entry))
        if grown == NULL:
            raise MemoryError()
        self._heap = grown
        self._cap = cap
        return 0

    def push(self, double due, long long handle):
        """Queue `handle` to become due at `due`."""
        if isnan(due):
            raise ValueError("due time must not be NaN")
        if self._size == self._cap:
            self._resize(self._cap * 2)
        cdef _Entry item
        item.due = due
        item.seq = self._seq
        item.handle = handle
        self._seq += 1
        # Sift up by moving parents down into the hole, then drop the new entry in once.
        cdef _Entry* heap = self._heap
        cdef Py_ssize_t pos = self._size, parent
        while pos > 0:
            parent = (pos - 1) >> 1
            if not _before(&item, &heap[parent]):
                break
            heap[pos] = heap[parent]
            pos = parent
        heap[pos] = item
        self._size += 1

    cdef long long _pop(self) noexcept:
        # Caller guarantees a non-empty heap.
        cdef _Entry* heap = self._heap
        cdef long long handle = heap[0].handle
        cdef Py_ssize_t size = self._size - 1
        cdef _Entry last = heap[size]
        cdef Py_ssize_t pos = 0, child
        self._size = size
        while True:
            child = 2 * pos + 1
            if child >= size:
                break
            if child + 1 < size and _before(&heap[child + 1], &heap[child]):
                child += 1
            if not _before(&heap[child], &last):
                break
            heap[pos] = heap[child]
            pos = child
        heap[pos] = last
        return handle

    def pop_due(self, double now, Py_ssize_t limit):
        """Remove and return at most `limit` handles with due <= `now`, earliest first."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        cdef list out = []
        cdef Py_ssize_t count = 0
        while count < limit and self._size > 0 and self._heap[0].due <= now:
            out.append(self._pop())
            count += 1
        cdef Py_ssize_t cap = self._cap
        while cap > _MIN_CAPACITY and self._size < cap // 4:
            cap //= 2
        if cap != self._cap:
            self._resize(cap)
        return out

    def next_due(self):
        """Return the earliest due time, or math.inf when the queue is empty."""
        if self._size == 0:
            return INFINITY
        return self._heap[0].due

    def __len__(self):
        """Return the number of queued handles."""
        return self._size

    def __repr__(self):
        return f"<DueQueue size={self._size} next_due={self.next_due()}>"


@cython.final
cdef class Ledger:
    """Per-source credit and assigned-job accounting that keeps a SourceMask in step."""

    cdef object _mask_set
    cdef Py_ssize_t _size
    cdef long long* _credit
    cdef long long* _assigned
    cdef unsigned char* _suspended
    cdef long long _total

    def __cinit__(self, mask):
        cdef Py_ssize_t size = len(mask)
        cdef size_t cells = <size_t>size + 1
        self._credit = <long long*>PyMem_Malloc(cells * sizeof(long long))
        self._assigned = <long long*>PyMem_Malloc(cells * sizeof(long long))
        self._suspended = <unsigned char*>PyMem_Malloc(cells)
        if self._credit == NULL or self._assigned == NULL or self._suspended == NULL:
            raise MemoryError()
        memset(self._credit, 0, cells * sizeof(long long))
        memset(self._assigned, 0, cells * sizeof(long long))
        memset(self._suspended, 0, cells)
        self._size = size
        self._total = 0
        # The mask may be either twin's SourceMask, so it is driven through its Python API.
        self._mask_set = mask.set
        cdef Py_ssize_t source
        for source in range(size):
            self._mask_set(source, False)

    def __dealloc__(self):
        PyMem_Free(self._credit)
        PyMem_Free(self._assigned)
        PyMem_Free(self._suspended)

    cdef inline int _check(self, Py_ssize_t source) except -1:
        if source < 0 or source >= self._size:
            raise IndexError(f"source index {source} out of range 0..{self._size - 1}")
        return 0

    cdef inline int _update(self, Py_ssize_t source) except -1:
        cdef bint eligible = (
            not self._suspended[source] and self._assigned[source] < self._credit[source]
        )
        self._mask_set(source, eligible)
        return 0

    def set_credit(self, Py_ssize_t source, long long credit):
        """Record the credit the worker of `source` announced (0 when the worker is gone)."""
        self._check(source)
        if credit < 0:
            raise ValueError(f"credit must be >= 0, not {credit}")
        self._credit[source] = credit
        self._update(source)

    def set_suspended(self, Py_ssize_t source, suspended):
        """Suspend `source` or resume it."""
        self._check(source)
        self._suspended[source] = 1 if suspended else 0
        self._update(source)

    def take(self, Py_ssize_t source):
        """Count one job dispatched to `source`."""
        self._check(source)
        cdef long long count = self._assigned[source]
        if count >= self._credit[source]:
            raise RuntimeError(
                f"source {source} has no credit left "
                f"({count} assigned, credit {self._credit[source]})"
            )
        self._assigned[source] = count + 1
        self._total += 1
        self._update(source)

    def release(self, Py_ssize_t source, long long n=1):
        """Count `n` jobs of `source` as finished."""
        self._check(source)
        cdef long long count = self._assigned[source]
        if n < 0 or n > count:
            raise ValueError(f"cannot release {n} jobs of source {source}: {count} assigned")
        self._assigned[source] = count - n
        self._total -= n
        self._update(source)

    def reset_assigned(self, Py_ssize_t source):
        """Forget the jobs assigned to `source` (its worker died); return how many there were."""
        self._check(source)
        cdef long long count = self._assigned[source]
        self._assigned[source] = 0
        self._total -= count
        self._update(source)
        return count

    def assigned(self, Py_ssize_t source):
        """Return the number of jobs of `source` assigned."""
        self._check(source)
        return self._assigned[source]

    def credit(self, Py_ssize_t source):
        """Return the credit last announced for `source`."""
        self._check(source)
        return self._credit[source]

    def available(self, Py_ssize_t source):
        """Return how many more jobs `source` may take now (0 when suspended)."""
        self._check(source)
        if self._suspended[source]:
            return 0
        cdef long long left = self._credit[source] - self._assigned[source]
        return left if left > 0 else 0

    def total_assigned(self):
        """Return the number of jobs assigned over all sources."""
        return self._total

    def __repr__(self):
        return f"<Ledger sources={self._size} assigned={self._total}>"
