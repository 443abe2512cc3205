# The spool's batch writer, compiled: one OS thread that commits batches to
# SQLite without ever taking the GIL.
#
# Why compiled: the spool used to commit on a Trio worker thread through
# Python's sqlite3 module. That thread needs the GIL to start, to bind every
# parameter and after every sqlite3_step, and the event loop thread holds the
# GIL nearly all the time under load, so each of those steps waited for the
# loop to let go (up to the 5 ms switch interval). Measured under MQTT QoS 1
# load: 2.5 ms from handing a batch over to the thread starting it, 4.3 ms to
# write 2.8 ms of CPU, 2.7 ms from the thread finishing to the loop hearing of
# it, in a 12.6 ms commit cycle that bounds every acknowledgement.
#
# Here the loop thread turns a batch into C cells (pointers into str and bytes
# objects it keeps alive until the batch is done), signals the writer thread,
# and waits on a pipe with trio.lowlevel.wait_readable. The writer thread
# binds, steps and commits in C and writes a byte to the pipe. It never touches a
# Python object, so it never waits for the GIL, and the loop never waits for
# it except through its own epoll.
#
# SQLite is reached through the very library Python's sqlite3 module uses:
# the functions are looked up with dlsym through the already loaded _sqlite3
# extension (dlopen with RTLD_NOLOAD), so they resolve to its copy of SQLite,
# whether shared or linked in. Two copies of SQLite in one process would not
# see each other's POSIX locks on the same file. No SQLite headers or link
# flags are needed to build this.
#
# This file is included into src/_fastparse.pyx; module-level private names
# start with _sw_.

from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memchr, memset, strncpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_CheckExact
from cpython.dict cimport PyDict_Next
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF

import os as _sw_os
import sqlite3 as _sw_sqlite3

import msgspec as _sw_msgspec

from gridgate.ingest.records import Record as _sw_Record

cdef extern from *:
    """
    #include <dlfcn.h>
    #include <pthread.h>
    #include <unistd.h>
    typedef struct gg_sqlite3 gg_sqlite3;
    typedef struct gg_sqlite3_stmt gg_sqlite3_stmt;
    """
    ctypedef struct gg_sqlite3
    ctypedef struct gg_sqlite3_stmt
    ctypedef struct pthread_t:
        pass
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *, void *) nogil
    int pthread_mutex_destroy(pthread_mutex_t *) nogil
    int pthread_mutex_lock(pthread_mutex_t *) nogil
    int pthread_mutex_unlock(pthread_mutex_t *) nogil
    int pthread_cond_init(pthread_cond_t *, void *) nogil
    int pthread_cond_destroy(pthread_cond_t *) nogil
    int pthread_cond_wait(pthread_cond_t *, pthread_mutex_t *) nogil
    int pthread_cond_signal(pthread_cond_t *) nogil
    int pthread_create(pthread_t *, void *, void *(*)(void *) noexcept nogil, void *) nogil
    int pthread_join(pthread_t, void **) nogil
    void *dlopen(const char *, int) nogil
    void *dlsym(void *, const char *) nogil
    int RTLD_NOW
    int RTLD_NOLOAD
    ssize_t write(int, const void *, size_t) nogil
    ssize_t read(int, void *, size_t) nogil
    int close(int) nogil

cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef *d_member

# The SQLite C API functions used, as pointers looked up once (_sw_load).
ctypedef int (*_sw_open_v2_t)(const char *, gg_sqlite3 **, int, const char *) noexcept nogil
ctypedef int (*_sw_close_v2_t)(gg_sqlite3 *) noexcept nogil
ctypedef int (*_sw_exec_t)(gg_sqlite3 *, const char *, void *, void *, char **) noexcept nogil
ctypedef int (*_sw_prepare_v2_t)(gg_sqlite3 *, const char *, int, gg_sqlite3_stmt **, const char **) noexcept nogil
ctypedef int (*_sw_bind_int64_t)(gg_sqlite3_stmt *, int, long long) noexcept nogil
ctypedef int (*_sw_bind_text_t)(gg_sqlite3_stmt *, int, const char *, int, void *) noexcept nogil
ctypedef int (*_sw_bind_null_t)(gg_sqlite3_stmt *, int) noexcept nogil
ctypedef int (*_sw_stmt_t)(gg_sqlite3_stmt *) noexcept nogil
ctypedef long long (*_sw_column_int64_t)(gg_sqlite3_stmt *, int) noexcept nogil
ctypedef const char *(*_sw_errmsg_t)(gg_sqlite3 *) noexcept nogil
ctypedef int (*_sw_busy_timeout_t)(gg_sqlite3 *, int) noexcept nogil
ctypedef int (*_sw_threadsafe_t)() noexcept nogil

cdef struct _sw_api_t:
    _sw_open_v2_t open_v2
    _sw_close_v2_t close_v2
    _sw_exec_t exec_
    _sw_prepare_v2_t prepare_v2
    _sw_bind_int64_t bind_int64
    _sw_bind_text_t bind_text
    _sw_bind_text_t bind_blob
    _sw_bind_null_t bind_null
    _sw_stmt_t step
    _sw_stmt_t reset
    _sw_stmt_t finalize
    _sw_column_int64_t column_int64
    _sw_errmsg_t errmsg
    _sw_busy_timeout_t busy_timeout
    _sw_threadsafe_t threadsafe

cdef _sw_api_t _sw_api
cdef object _sw_loaded_from = None

# sqlite3.h constants (stable ABI values)
cdef int _SW_OK = 0
cdef int _SW_ROW = 100
cdef int _SW_DONE = 101
cdef int _SW_OPEN_READWRITE = 0x00000002
cdef int _SW_OPEN_NOMUTEX = 0x00008000

# cell kinds
cdef enum:
    _SW_NULL = 0
    _SW_INT = 1
    _SW_TEXT = 2
    _SW_BLOB = 3

# prepared statements
cdef enum:
    _SW_BEGIN = 0
    _SW_COMMIT = 1
    _SW_ROLLBACK = 2
    _SW_INSERT_RECORD = 3
    _SW_INSERT_PENDING = 4
    _SW_INSERT_REJECTION = 5
    _SW_COUNT_RECORDS = 6
    _SW_COUNT_PENDING = 7
    _SW_PAGE_COUNT = 8
    _SW_FREELIST_COUNT = 9
    _SW_PAGE_SIZE = 10
    # the same INSERTs with many VALUES rows: one statement (one cursor, one
    # VDBE program run) per _sw_state.many_rows rows instead of per row
    _SW_INSERT_RECORDS_MANY = 11
    _SW_INSERT_PENDING_MANY = 12
    _SW_INSERT_REJECTIONS_MANY = 13
    _SW_N_STMTS = 14

cdef int _SW_RECORD_COLUMNS = 8       # gridgate.storage.spool._ROW_COLUMNS
cdef int _SW_REJECTION_COLUMNS = 8    # gridgate.storage.spool._REJECTION_COLUMNS
cdef dict _SW_STATEMENT_PARAMS = {"insert_records": _SW_RECORD_COLUMNS, "insert_pending": _SW_RECORD_COLUMNS,
                                  "insert_rejections": _SW_REJECTION_COLUMNS, "count_records": 2, "count_pending": 2}
# the many-row INSERTs: a multiple of the columns, the same for records and pending
cdef dict _SW_MANY_STATEMENTS = {"insert_records_many": _SW_RECORD_COLUMNS, "insert_pending_many": _SW_RECORD_COLUMNS,
                                 "insert_rejections_many": _SW_REJECTION_COLUMNS}

cdef struct _sw_cell:
    int kind
    long long i
    const char *p
    Py_ssize_t n

cdef struct _sw_state:
    pthread_mutex_t mu
    pthread_cond_t cv
    bint has_job            # a batch is handed over and not yet done
    bint stop
    int done_r              # the pipe the thread signals a finished batch on
    int done_w
    gg_sqlite3 *db
    gg_sqlite3_stmt *stmts[_SW_N_STMTS]
    Py_ssize_t record_rows_many     # rows per statement of _SW_INSERT_RECORDS_MANY and _PENDING_MANY
    Py_ssize_t rejection_rows_many  # and of _SW_INSERT_REJECTIONS_MANY
    # the batch
    _sw_cell *cells
    Py_ssize_t n_records
    Py_ssize_t n_rejections
    bint pending
    bint measure
    # its outcome
    int rc
    int code                # SQLite primary result code of the failure
    long long used_bytes
    char err[512]


def _sw_load(str library_path):
    """Bind the SQLite C API as seen from the already loaded shared object
    ``library_path`` (the _sqlite3 extension): its own symbols, then its
    dependencies'."""
    global _sw_loaded_from
    if _sw_loaded_from is not None:
        if _sw_loaded_from != library_path:
            raise RuntimeError(f"native spool writer already bound to {_sw_loaded_from}")
        return
    cdef bytes path = library_path.encode()
    cdef void *lib = dlopen(path, RTLD_NOW | RTLD_NOLOAD)
    if lib == NULL:
        raise OSError(f"{library_path} is not loaded in this process")
    cdef dict names = {}
    for name in ("sqlite3_open_v2", "sqlite3_close_v2", "sqlite3_exec", "sqlite3_prepare_v2", "sqlite3_bind_int64",
                 "sqlite3_bind_text", "sqlite3_bind_blob", "sqlite3_bind_null", "sqlite3_step", "sqlite3_reset",
                 "sqlite3_finalize", "sqlite3_column_int64", "sqlite3_errmsg", "sqlite3_busy_timeout",
                 "sqlite3_threadsafe"):
        sym = dlsym(lib, (<str>name).encode())
        if sym == NULL:
            raise OSError(f"{name} is not reachable from {library_path}")
        names[name] = <size_t>sym
    _sw_api.open_v2 = <_sw_open_v2_t><size_t>names["sqlite3_open_v2"]
    _sw_api.close_v2 = <_sw_close_v2_t><size_t>names["sqlite3_close_v2"]
    _sw_api.exec_ = <_sw_exec_t><size_t>names["sqlite3_exec"]
    _sw_api.prepare_v2 = <_sw_prepare_v2_t><size_t>names["sqlite3_prepare_v2"]
    _sw_api.bind_int64 = <_sw_bind_int64_t><size_t>names["sqlite3_bind_int64"]
    _sw_api.bind_text = <_sw_bind_text_t><size_t>names["sqlite3_bind_text"]
    _sw_api.bind_blob = <_sw_bind_text_t><size_t>names["sqlite3_bind_blob"]
    _sw_api.bind_null = <_sw_bind_null_t><size_t>names["sqlite3_bind_null"]
    _sw_api.step = <_sw_stmt_t><size_t>names["sqlite3_step"]
    _sw_api.reset = <_sw_stmt_t><size_t>names["sqlite3_reset"]
    _sw_api.finalize = <_sw_stmt_t><size_t>names["sqlite3_finalize"]
    _sw_api.column_int64 = <_sw_column_int64_t><size_t>names["sqlite3_column_int64"]
    _sw_api.errmsg = <_sw_errmsg_t><size_t>names["sqlite3_errmsg"]
    _sw_api.busy_timeout = <_sw_busy_timeout_t><size_t>names["sqlite3_busy_timeout"]
    _sw_api.threadsafe = <_sw_threadsafe_t><size_t>names["sqlite3_threadsafe"]
    if _sw_api.threadsafe() == 0:
        raise OSError(f"{library_path} was built without thread support (SQLITE_THREADSAFE=0)")
    _sw_loaded_from = library_path


# -- the writer thread (no GIL, no Python objects) ----------------------------------

cdef int _sw_fail(_sw_state *st, int rc) noexcept nogil:
    st.code = rc & 0xFF
    strncpy(st.err, _sw_api.errmsg(st.db), 511)
    st.err[511] = 0
    return -1


cdef int _sw_step_once(_sw_state *st, gg_sqlite3_stmt *stmt) noexcept nogil:
    cdef int rc = _sw_api.step(stmt)
    if rc != _SW_DONE and rc != _SW_ROW:
        _sw_fail(st, rc)            # before the reset: that would replace the message
        _sw_api.reset(stmt)
        return -1
    _sw_api.reset(stmt)
    return 0


cdef int _sw_bind_rows(_sw_state *st, gg_sqlite3_stmt *stmt, _sw_cell *cells, Py_ssize_t rows,
                       int columns) noexcept nogil:
    """Bind rows x columns cells to parameters 1.. of stmt, in order."""
    cdef Py_ssize_t i
    cdef int rc
    cdef _sw_cell *cell
    for i in range(rows * columns):
        cell = &cells[i]
        if cell.kind == _SW_INT:
            rc = _sw_api.bind_int64(stmt, <int>i + 1, cell.i)
        elif cell.kind == _SW_TEXT:
            rc = _sw_api.bind_text(stmt, <int>i + 1, cell.p, <int>cell.n, NULL)      # NULL: SQLITE_STATIC
        elif cell.kind == _SW_BLOB:
            rc = _sw_api.bind_blob(stmt, <int>i + 1, cell.p, <int>cell.n, NULL)
        else:
            rc = _sw_api.bind_null(stmt, <int>i + 1)
        if rc != _SW_OK:
            _sw_fail(st, rc)
            _sw_api.reset(stmt)
            return -1
    return 0


cdef int _sw_insert_rows(_sw_state *st, gg_sqlite3_stmt *one, gg_sqlite3_stmt *many, Py_ssize_t per_many,
                         _sw_cell *cells, Py_ssize_t rows, int columns) noexcept nogil:
    """rows rows: per_many at a time with `many`, the rest one by one with `one`."""
    cdef Py_ssize_t r = 0
    while rows - r >= per_many:
        if (_sw_bind_rows(st, many, cells + r * columns, per_many, columns) < 0
                or _sw_step_once(st, many) < 0):
            return -1
        r += per_many
    while r < rows:
        if _sw_bind_rows(st, one, cells + r * columns, 1, columns) < 0 or _sw_step_once(st, one) < 0:
            return -1
        r += 1
    return 0


cdef int _sw_scalar(_sw_state *st, int which, long long *out) noexcept nogil:
    cdef gg_sqlite3_stmt *stmt = st.stmts[which]
    cdef int rc = _sw_api.step(stmt)
    if rc != _SW_ROW:
        _sw_fail(st, rc)
        _sw_api.reset(stmt)
        return -1
    out[0] = _sw_api.column_int64(stmt, 0)
    _sw_api.reset(stmt)
    return 0


cdef int _sw_write(_sw_state *st) noexcept nogil:
    """One batch in one transaction, as gridgate.storage.spool.Spool.write_batch."""
    cdef gg_sqlite3_stmt *counter
    cdef int rc
    cdef long long page_count, freelist, page_size
    if _sw_step_once(st, st.stmts[_SW_BEGIN]) < 0:
        return -1
    if (_sw_insert_rows(st, st.stmts[_SW_INSERT_PENDING if st.pending else _SW_INSERT_RECORD],
                        st.stmts[_SW_INSERT_PENDING_MANY if st.pending else _SW_INSERT_RECORDS_MANY],
                        st.record_rows_many, st.cells, st.n_records, _SW_RECORD_COLUMNS) < 0
            or _sw_insert_rows(st, st.stmts[_SW_INSERT_REJECTION], st.stmts[_SW_INSERT_REJECTIONS_MANY],
                               st.rejection_rows_many, st.cells + st.n_records * _SW_RECORD_COLUMNS,
                               st.n_rejections, _SW_REJECTION_COLUMNS) < 0):
        _sw_rollback(st)
        return -1
    counter = st.stmts[_SW_COUNT_PENDING if st.pending else _SW_COUNT_RECORDS]
    rc = _sw_api.bind_int64(counter, 1, st.n_records)
    if rc == _SW_OK:
        rc = _sw_api.bind_int64(counter, 2, st.n_rejections)
    if rc != _SW_OK:
        _sw_fail(st, rc)
    if rc != _SW_OK or _sw_step_once(st, counter) < 0 or _sw_step_once(st, st.stmts[_SW_COMMIT]) < 0:
        _sw_rollback(st)
        return -1
    if st.measure:
        # gridgate.storage.spool.Spool.used_bytes: pages holding data (the
        # WAL's pages are among them; its file's size is not)
        if (_sw_scalar(st, _SW_PAGE_COUNT, &page_count) < 0 or _sw_scalar(st, _SW_FREELIST_COUNT, &freelist) < 0
                or _sw_scalar(st, _SW_PAGE_SIZE, &page_size) < 0):
            return -1
        st.used_bytes = (page_count - freelist) * page_size
    return 0


cdef void _sw_rollback(_sw_state *st) noexcept nogil:
    # keeps the first error's code and message; a failed COMMIT may have
    # ended the transaction already, so this one may fail too
    cdef int code = st.code
    cdef char saved[512]
    strncpy(saved, st.err, 512)
    _sw_step_once(st, st.stmts[_SW_ROLLBACK])
    st.code = code
    strncpy(st.err, saved, 512)


cdef void *_sw_main(void *arg) noexcept nogil:
    cdef _sw_state *st = <_sw_state *>arg
    cdef char one = 1
    while True:
        pthread_mutex_lock(&st.mu)
        while not st.has_job and not st.stop:
            pthread_cond_wait(&st.cv, &st.mu)
        if st.stop and not st.has_job:
            pthread_mutex_unlock(&st.mu)
            return NULL
        pthread_mutex_unlock(&st.mu)
        st.err[0] = 0
        st.rc = _sw_write(st)
        pthread_mutex_lock(&st.mu)
        st.has_job = False
        pthread_mutex_unlock(&st.mu)
        write(st.done_w, &one, 1)


cdef object _sw_error_class(int code):
    """The sqlite3 exception class Python's sqlite3 raises for this primary result code."""
    if code == 19 or code == 20:                            # CONSTRAINT, MISMATCH
        return _sw_sqlite3.IntegrityError
    if code == 7:                                           # NOMEM
        return MemoryError
    if code == 2 or code == 12:                             # INTERNAL, NOTFOUND
        return _sw_sqlite3.InternalError
    if code == 18:                                          # TOOBIG
        return _sw_sqlite3.DataError
    if code == 21:                                          # MISUSE
        return _sw_sqlite3.ProgrammingError
    if code in (1, 3, 4, 5, 6, 8, 9, 10, 13, 14, 15, 16, 17):
        return _sw_sqlite3.OperationalError
    return _sw_sqlite3.DatabaseError


# -- the Python face ---------------------------------------------------------------

cdef class SpoolWriter:
    """Commits batches to a spool file on its own OS thread.

    Use from one thread at a time: ``start(...)``; when ``fileno()`` turns
    readable, ``clear_signal()``; once ``ready``, ``finish()``. The spool file must exist
    with its schema (gridgate.storage.spool.Spool creates it) and be in WAL mode.
    """

    cdef _sw_state *st
    cdef pthread_t thread
    cdef bint thread_started
    cdef bint _busy
    cdef object refs               # what the cells point into, kept alive while busy
    cdef readonly str path

    def __cinit__(self):
        self.st = <_sw_state *>malloc(sizeof(_sw_state))
        if self.st == NULL:
            raise MemoryError()
        memset(self.st, 0, sizeof(_sw_state))
        self.st.done_r = -1
        self.st.done_w = -1
        pthread_mutex_init(&self.st.mu, NULL)
        pthread_cond_init(&self.st.cv, NULL)

    def __init__(self, str library_path, str path, dict statements, bint fsync=False, int busy_timeout_ms=5000):
        """``statements``: the spool's own SQL (gridgate.storage.spool.Spool.writer_statements),
        so the schema is written down once: "insert_records", "insert_pending"
        (8 parameters), "insert_rejections" (8), "count_records",
        "count_pending" (records or pending, then rejected), and the same
        three INSERTs of many rows: "insert_records_many" and
        "insert_pending_many" (one number of rows, 8 parameters each),
        "insert_rejections_many" (8 each)."""
        _sw_load(library_path)
        for key, params in _SW_STATEMENT_PARAMS.items():
            text = statements.get(key)
            if not isinstance(text, str) or text.count("?") != params:
                raise ValueError(f"statement {key!r} must be SQL with {params} parameters, not {text!r}")
        cdef dict many_rows = {}
        for key, params in _SW_MANY_STATEMENTS.items():
            text = statements.get(key)
            if not isinstance(text, str) or not text.count("?") or text.count("?") % params:
                raise ValueError(f"statement {key!r} must be SQL with a multiple of {params} parameters, not {text!r}")
            many_rows[key] = text.count("?") // params
        if many_rows["insert_records_many"] != many_rows["insert_pending_many"]:
            raise ValueError("insert_records_many and insert_pending_many must insert as many rows")
        cdef _sw_state *st = self.st
        st.record_rows_many = many_rows["insert_records_many"]
        st.rejection_rows_many = many_rows["insert_rejections_many"]
        self.path = path
        cdef bytes bpath = path.encode()
        cdef int rc = _sw_api.open_v2(bpath, &st.db, _SW_OPEN_READWRITE | _SW_OPEN_NOMUTEX, NULL)
        if rc != _SW_OK:
            msg = "out of memory" if st.db == NULL else _sw_api.errmsg(st.db).decode(errors="replace")
            raise OSError(f"cannot open {path}: {msg}")
        _sw_api.busy_timeout(st.db, busy_timeout_ms)
        self._exec(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        if not self._in_wal_mode():
            raise OSError(f"{path} is not in WAL mode")
        sqls = {
            _SW_BEGIN: "BEGIN",
            _SW_COMMIT: "COMMIT",
            _SW_ROLLBACK: "ROLLBACK",
            _SW_INSERT_RECORD: statements["insert_records"],
            _SW_INSERT_PENDING: statements["insert_pending"],
            _SW_INSERT_REJECTION: statements["insert_rejections"],
            _SW_COUNT_RECORDS: statements["count_records"],
            _SW_COUNT_PENDING: statements["count_pending"],
            _SW_PAGE_COUNT: "PRAGMA page_count",
            _SW_FREELIST_COUNT: "PRAGMA freelist_count",
            _SW_PAGE_SIZE: "PRAGMA page_size",
            _SW_INSERT_RECORDS_MANY: statements["insert_records_many"],
            _SW_INSERT_PENDING_MANY: statements["insert_pending_many"],
            _SW_INSERT_REJECTIONS_MANY: statements["insert_rejections_many"],
        }
        cdef bytes sql
        for which, text in sqls.items():
            sql = text.encode()
            if _sw_api.prepare_v2(st.db, sql, -1, &st.stmts[<int>which], NULL) != _SW_OK:
                raise OSError(f"cannot prepare {text!r} on {path}: {_sw_api.errmsg(st.db).decode(errors='replace')}")
        st.done_r, st.done_w = _sw_os.pipe()        # close-on-exec
        _sw_os.set_blocking(st.done_r, False)
        if pthread_create(&self.thread, NULL, _sw_main, st) != 0:
            raise OSError("cannot start the spool writer thread")
        self.thread_started = True

    cdef _exec(self, str text):
        cdef bytes sql = text.encode()
        if _sw_api.exec_(self.st.db, sql, NULL, NULL, NULL) != _SW_OK:
            raise OSError(f"{text} on {self.path}: {_sw_api.errmsg(self.st.db).decode(errors='replace')}")

    cdef bint _in_wal_mode(self):
        cdef bytes sql = b"SELECT 1 FROM pragma_journal_mode WHERE journal_mode = 'wal'"
        cdef gg_sqlite3_stmt *stmt = NULL
        if _sw_api.prepare_v2(self.st.db, sql, -1, &stmt, NULL) != _SW_OK:
            raise OSError(f"reading the journal mode of {self.path}: "
                          f"{_sw_api.errmsg(self.st.db).decode(errors='replace')}")
        cdef int rc = _sw_api.step(stmt)
        _sw_api.finalize(stmt)
        return rc == _SW_ROW

    def fileno(self) -> int:
        """The pipe end that turns readable when the batch handed over is done."""
        return self.st.done_r

    @property
    def busy(self) -> bool:
        return self._busy

    def start(self, list records, list rejections, bint pending=False, bint measure=False):
        """Hand a batch to the writer thread and return at once.

        ``records``: 8-tuples (device_id, ts_ns, received_ns, protocol,
        fields, tags, traceparent, tracestate); ``rejections``: 8-tuples (received_ns, protocol,
        reason, field, idx, device_id, detail, raw), as gridgate.storage.spool builds
        them. Values: str (TEXT), bytes (BLOB), int (INTEGER) or None.
        ``measure``: also report the spool's used bytes (see finish).
        """
        self._check_idle()
        cdef Py_ssize_t nrec = len(records), nrej = len(rejections)
        cdef Py_ssize_t ncells = nrec * _SW_RECORD_COLUMNS + nrej * _SW_REJECTION_COLUMNS
        cdef _sw_cell *cells = <_sw_cell *>malloc((ncells if ncells else 1) * sizeof(_sw_cell))
        if cells == NULL:
            raise MemoryError()
        try:
            _sw_fill(cells, records, _SW_RECORD_COLUMNS)
            _sw_fill(cells + nrec * _SW_RECORD_COLUMNS, rejections, _SW_REJECTION_COLUMNS)
        except BaseException:
            free(cells)
            raise
        # tuples: the caller may change its lists, the cells point into the rows
        self._hand_over(cells, nrec, nrej, pending, measure, (tuple(records), tuple(rejections)))

    def start_records(self, list records, list rejections, bint pending=False, bint measure=False):
        """As ``start``, from the Records themselves (gridgate.ingest.records.Record)
        instead of their rows: the rows gridgate.storage.spool.record_rows would
        make, byte for byte, without a tuple and two encoder calls per
        reading. Each reading's fields (and tags) are encoded by msgspec in one
        call per batch, as a JSON array the cells then point into; a reading
        whose tags hold the very same keys and values as the reading before
        it (a copy of the validator's per-location tags, a device's run of
        readings) shares that reading's encoding. ``rejections``: rows, as for
        ``start``.
        """
        self._check_idle()
        cdef Py_ssize_t nrec = len(records), nrej = len(rejections)
        cdef Py_ssize_t ncells = nrec * _SW_RECORD_COLUMNS + nrej * _SW_REJECTION_COLUMNS
        cdef _sw_cell *cells = <_sw_cell *>malloc((ncells if ncells else 1) * sizeof(_sw_cell))
        if cells == NULL:
            raise MemoryError()
        cdef tuple recs = tuple(records)
        cdef object encoded
        try:
            encoded = _sw_fill_records(cells, recs)
            _sw_fill(cells + nrec * _SW_RECORD_COLUMNS, rejections, _SW_REJECTION_COLUMNS)
        except BaseException:
            free(cells)
            raise
        self._hand_over(cells, nrec, nrej, pending, measure, (recs, encoded, tuple(rejections)))

    cdef _check_idle(self):
        if self._busy:
            raise RuntimeError("the spool writer is still writing the previous batch")
        if not self.thread_started:
            raise RuntimeError("the spool writer is closed")

    cdef _hand_over(self, _sw_cell *cells, Py_ssize_t nrec, Py_ssize_t nrej, bint pending, bint measure,
                    object refs):
        cdef _sw_state *st = self.st
        self.refs = refs
        pthread_mutex_lock(&st.mu)
        st.cells = cells
        st.n_records = nrec
        st.n_rejections = nrej
        st.pending = pending
        st.measure = measure
        st.has_job = True
        pthread_cond_signal(&st.cv)
        pthread_mutex_unlock(&st.mu)
        self._busy = True

    @property
    def ready(self) -> bool:
        """The batch handed over is written (committed or failed): finish() it."""
        cdef bint done
        pthread_mutex_lock(&self.st.mu)
        done = self._busy and not self.st.has_job
        pthread_mutex_unlock(&self.st.mu)
        return done

    def clear_signal(self) -> None:
        """Empty the pipe behind ``fileno()`` (one byte per written batch):
        after it turned readable, before looking at ``ready``."""
        cdef char buf[64]
        while read(self.st.done_r, buf, 64) == 64:
            pass

    def finish(self):
        """Once ``fileno()`` is readable: the used bytes (-1 unless
        measured), or the SQLite error as sqlite3.OperationalError (nothing of
        the batch was written then).

        Raises BlockingIOError while the batch is still being written.
        """
        cdef _sw_state *st = self.st
        if not self._busy:
            raise RuntimeError("no batch handed over")
        pthread_mutex_lock(&st.mu)             # orders the thread's writes of rc/err before our reads
        done = not st.has_job
        pthread_mutex_unlock(&st.mu)
        if not done:
            raise BlockingIOError("the batch is not written yet")
        self._busy = False
        free(st.cells)
        st.cells = NULL
        self.refs = None
        if st.rc != 0:
            raise _sw_error_class(st.code)((<bytes>st.err).decode(errors="replace"))
        return st.used_bytes if st.measure else -1

    def close(self):
        """Stop the thread (after the batch in hand, if any) and close the connection."""
        self._close()
        self.refs = None

    cdef void _close(self) noexcept:
        # no Python objects touched: __dealloc__ calls this too
        cdef _sw_state *st = self.st
        cdef int i
        if st == NULL:
            return
        if self.thread_started:
            pthread_mutex_lock(&st.mu)
            st.stop = True
            pthread_cond_signal(&st.cv)
            pthread_mutex_unlock(&st.mu)
            with nogil:
                pthread_join(self.thread, NULL)
            self.thread_started = False
        if self._busy:
            free(st.cells)
            st.cells = NULL
            self._busy = False
        for i in range(_SW_N_STMTS):
            if st.stmts[i] != NULL:
                _sw_api.finalize(st.stmts[i])
                st.stmts[i] = NULL
        if st.db != NULL:
            _sw_api.close_v2(st.db)
            st.db = NULL
        if st.done_r >= 0:
            close(st.done_r)
            close(st.done_w)
            st.done_r = st.done_w = -1

    def __dealloc__(self):
        if self.st != NULL:
            self._close()
            pthread_cond_destroy(&self.st.cv)
            pthread_mutex_destroy(&self.st.mu)
            free(self.st)
            self.st = NULL


cdef int _sw_set(_sw_cell *cell, object v, Py_ssize_t r, int c) except -1:
    """One cell from a value: str (TEXT), bytes (BLOB), int (INTEGER) or None."""
    cdef Py_ssize_t n
    cdef int overflow
    cell.p = NULL
    cell.n = 0
    if v is None:
        cell.kind = _SW_NULL
    elif PyUnicode_CheckExact(v):
        cell.kind = _SW_TEXT
        cell.p = PyUnicode_AsUTF8AndSize(v, &n)
        cell.n = n
    elif PyBytes_CheckExact(v):
        cell.kind = _SW_BLOB
        cell.p = PyBytes_AS_STRING(v)
        cell.n = PyBytes_GET_SIZE(v)
    elif PyLong_CheckExact(v):
        cell.kind = _SW_INT
        # not PyLong_AsLongLong: it converts a multi-digit int (every ns
        # timestamp) through a byte array
        cell.i = PyLong_AsLongLongAndOverflow(v, &overflow)
        if overflow:
            raise OverflowError("int too big to convert")
    else:
        raise TypeError(f"row {r} column {c}: {type(v).__name__} is not str, bytes, int or None")
    if cell.n > 0x7FFFFFFF:
        raise ValueError(f"row {r} column {c}: value too large for SQLite")
    return 0


cdef int _sw_fill(_sw_cell *cells, list rows, int columns) except -1:
    cdef Py_ssize_t r = 0
    cdef int c
    cdef tuple row
    for obj in rows:
        row = <tuple?>obj
        if len(row) != columns:
            raise ValueError(f"row {r} has {len(row)} values, not {columns}")
        for c in range(columns):
            _sw_set(&cells[r * columns + c], row[c], r, c)
        r += 1
    return 0


# Record's fields in the records table's column order (_ROW_COLUMNS of
# gridgate.storage.spool); where each lives in a Record (its member
# descriptors' offsets), read at the first batch.
cdef tuple _SW_RECORD_FIELDS = ("device_id", "ts_ns", "received_ns", "protocol", "fields", "tags", "traceparent",
                                "tracestate")
cdef Py_ssize_t _sw_record_offsets[8]
cdef bint _sw_record_offsets_known = False
cdef object _sw_record_type = _sw_Record
cdef bytes _SW_NO_TAGS = b"{}"
cdef object _sw_json_encode = _sw_msgspec.json.Encoder().encode


cdef int _sw_find_record_offsets() except -1:
    global _sw_record_offsets_known
    member_descriptor = type(_sw_record_type.__dict__["device_id"])
    for c, name in enumerate(_SW_RECORD_FIELDS):
        descr = _sw_record_type.__dict__[name]
        if type(descr) is not member_descriptor:        # not a msgspec Struct's slot: cannot happen
            raise TypeError(f"Record.{name} is not a member descriptor")
        _sw_record_offsets[c] = (<PyMemberDescrObject *><PyObject *>descr).d_member.offset
    _sw_record_offsets_known = True
    return 0


cdef inline object _sw_field(object rec, int c, list keep):
    """Record field c (of _SW_RECORD_FIELDS). Read from its slot for a
    Record; for anything else by getattr, the value then also kept in
    ``keep`` (a property may make a new object the cells would outlive)."""
    cdef PyObject *v
    if type(rec) is _sw_record_type:
        v = (<PyObject **>((<char *><PyObject *>rec) + _sw_record_offsets[c]))[0]
        if v != NULL:
            return <object>v
    value = getattr(rec, <str>_SW_RECORD_FIELDS[c])
    keep.append(value)
    return value


cdef bint _sw_same_items(object a, object b):
    """True when the dicts a and b hold the very same key and value objects
    in the same order (so they encode alike); False when unsure."""
    if a is b:
        return True
    if type(a) is not dict or type(b) is not dict or len(<dict>a) != len(<dict>b):
        return False
    cdef Py_ssize_t i = 0, j = 0
    cdef PyObject *ka
    cdef PyObject *va
    cdef PyObject *kb
    cdef PyObject *vb
    while PyDict_Next(a, &i, &ka, &va):
        if not PyDict_Next(b, &j, &kb, &vb) or ka != kb or va != vb:
            return False
    return True


# the bytes _sw_split must look at; every other byte is skipped by one table lookup
cdef unsigned char _sw_json_special[256]


cdef void _sw_init_json_special() noexcept:
    cdef const char *chars = b'"\\{}[],'
    cdef int i
    memset(_sw_json_special, 0, 256)
    for i in range(7):
        _sw_json_special[<unsigned char>chars[i]] = 1


_sw_init_json_special()


cdef inline Py_ssize_t _sw_string_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t end) noexcept:
    """Just past the closing quote of the JSON string whose contents start at i."""
    cdef const unsigned char *q
    cdef Py_ssize_t j
    while i < end:
        q = <const unsigned char *>memchr(p + i, b'"', end - i)
        if q == NULL:
            return end
        j = q - p
        i = j + 1
        # escaped when an odd number of backslashes stands before it
        while j > 0 and p[j - 1] == b'\\':
            j -= 1
        if ((i - 1) - j) % 2 == 0:
            return i
    return end


cdef int _sw_split(bytes encoded, Py_ssize_t *starts, Py_ssize_t count) except -1:
    """The start of each of the count elements of a JSON array as msgspec
    writes it (no whitespace), and its end (starts[count]: one past a comma).
    Commas inside strings and nested values are skipped."""
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(encoded)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(encoded), i = 1, k = 0, depth = 0, end = n - 1
    cdef unsigned char ch
    if n < 2 or p[0] != b'[' or p[end] != b']':
        raise ValueError("not a JSON array")
    starts[0] = 1
    while i < end:
        ch = p[i]
        i += 1
        if not _sw_json_special[ch]:
            continue
        if ch == b'"':
            i = _sw_string_end(p, i, end)
        elif ch == b',':
            if depth == 0:
                k += 1
                if k >= count:
                    raise ValueError("more JSON array elements than readings")
                starts[k] = i
        elif ch == b'{' or ch == b'[':
            depth += 1
        else:
            depth -= 1
    if k != count - 1:
        raise ValueError("fewer JSON array elements than readings")
    starts[count] = n           # the closing bracket stands where a comma would
    return 0


cdef object _sw_fill_records(_sw_cell *cells, tuple records):
    """The cells of the records' rows (as record_rows makes them); returns
    what they point into that the records do not hold (the encodings)."""
    cdef Py_ssize_t nrec = len(records), r, k, ntags = 0
    if not nrec:
        return None
    if not _sw_record_offsets_known:
        _sw_find_record_offsets()
    cdef int c
    cdef object rec, tags, prev_tags = None
    cdef _sw_cell *row
    cdef list fields = PyList_New(nrec)
    cdef list distinct_tags = []
    cdef list keep = []
    # per reading: its tags' element in distinct_tags, or -1 for "{}"
    cdef Py_ssize_t *tag_of = <Py_ssize_t *>malloc(nrec * sizeof(Py_ssize_t))
    cdef Py_ssize_t *starts = <Py_ssize_t *>malloc((nrec + 1) * sizeof(Py_ssize_t))
    cdef bytes fields_json, tags_json = None
    try:
        if tag_of == NULL or starts == NULL:
            raise MemoryError()
        for r in range(nrec):
            rec = records[r]
            row = cells + r * _SW_RECORD_COLUMNS
            _sw_set(&row[0], _sw_field(rec, 0, keep), r, 0)
            _sw_set(&row[1], _sw_field(rec, 1, keep), r, 1)
            _sw_set(&row[2], _sw_field(rec, 2, keep), r, 2)
            _sw_set(&row[3], _sw_field(rec, 3, keep), r, 3)
            _sw_set(&row[6], _sw_field(rec, 6, keep), r, 6)
            _sw_set(&row[7], _sw_field(rec, 7, keep), r, 7)
            v = _sw_field(rec, 4, keep)
            Py_INCREF(v)
            PyList_SET_ITEM(fields, r, v)
            tags = _sw_field(rec, 5, keep)
            if not tags:
                tag_of[r] = -1
            elif ntags and _sw_same_items(tags, prev_tags):
                tag_of[r] = ntags - 1
            else:
                distinct_tags.append(tags)
                tag_of[r] = ntags
                ntags += 1
                prev_tags = tags
        fields_json = _sw_json_encode(fields)
        _sw_split(fields_json, starts, nrec)
        for r in range(nrec):
            row = cells + r * _SW_RECORD_COLUMNS + 4
            row.kind = _SW_BLOB
            row.p = PyBytes_AS_STRING(fields_json) + starts[r]
            row.n = starts[r + 1] - 1 - starts[r]
        if ntags:
            tags_json = _sw_json_encode(distinct_tags)
            _sw_split(tags_json, starts, ntags)
        for r in range(nrec):
            row = cells + r * _SW_RECORD_COLUMNS + 5
            row.kind = _SW_BLOB
            k = tag_of[r]
            if k < 0:
                row.p = PyBytes_AS_STRING(_SW_NO_TAGS)
                row.n = 2
            else:
                row.p = PyBytes_AS_STRING(tags_json) + starts[k]
                row.n = starts[k + 1] - 1 - starts[k]
            if row.n > 0x7FFFFFFF or (row - 1).n > 0x7FFFFFFF:
                raise ValueError(f"row {r}: value too large for SQLite")
    finally:
        free(tag_of)
        free(starts)
    return (fields_json, tags_json, keep)
