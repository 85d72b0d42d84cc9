/* kanmon._scan: the two scans over every received message's octets, in C.
 *
 * Role: the optional compiled half of kanmon/scan.py, which holds the same functions in
 * Python and says what each returns; that module uses these when this one was built
 * (setup.py builds it where a C compiler is found; the install goes on without it).
 * CPython runs bytes.count and bytes.find for two octets one octet at a time, and
 * translate builds a new object: on this project's machine class those passes cost
 * ~330 us of a 100 KB message (docs/performance.md). Here they read 16 octets a step
 * (SSE2; without it, plain loops, and kanmon/scan.py keeps its own: VECTOR says which).
 * strip_cr finds each CR with memchr and copies the runs between with memcpy, the C
 * library's own block-at-a-time loops: kanmon/scan.py uses it wherever this module was built.
 *
 * Trusts: nothing in the octets. Reads only inside the buffer it was given (each
 * 16-octet load is at most the buffer's last 16 octets; a pattern is compared only where
 * all its octets are inside). Never: write to the buffer, keep a reference to it, or return
 * anything but what the Python definitions in kanmon/scan.py return
 * (tests/unit/test_scan.py compares the two on generated and hostile input).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#if defined(__SSE2__)
/* The sum of the 16 octet counters of acc. */
static Py_ssize_t sum_octets(__m128i acc)
{
    __m128i sums = _mm_sad_epu8(acc, _mm_setzero_si128());
    return (Py_ssize_t)_mm_cvtsi128_si32(sums) + (Py_ssize_t)_mm_cvtsi128_si32(_mm_srli_si128(sums, 8));
}
#endif

/* (crlf, cr, lf): how many "\r\n" pairs, "\r" and "\n" octets the buffer holds. */
static void count_line_ends(const unsigned char *s, Py_ssize_t n, Py_ssize_t *crlf, Py_ssize_t *cr,
                            Py_ssize_t *lf)
{
    Py_ssize_t i = 0, c_crlf = 0, c_cr = 0, c_lf = 0;
#if defined(__SSE2__)
    if (n >= 17) {
        const __m128i vcr = _mm_set1_epi8('\r'), vlf = _mm_set1_epi8('\n');
        c_cr = s[0] == '\r';
        c_lf = s[0] == '\n';
        i = 1;
        /* Each step: the 16 octets at i, and the 16 before them by one (s + i - 1), whose
         * "\r" a "\n" at i follows. Counted per octet lane, at most 255 steps a round. */
        while (i + 16 <= n) {
            __m128i acc_cr = _mm_setzero_si128(), acc_lf = _mm_setzero_si128(), acc_crlf = _mm_setzero_si128();
            int steps = 0;
            for (; steps < 255 && i + 16 <= n; steps++, i += 16) {
                __m128i v = _mm_loadu_si128((const __m128i *)(s + i));
                __m128i before = _mm_loadu_si128((const __m128i *)(s + i - 1));
                __m128i is_cr = _mm_cmpeq_epi8(v, vcr), is_lf = _mm_cmpeq_epi8(v, vlf);
                acc_cr = _mm_sub_epi8(acc_cr, is_cr); /* a match is -1 in its lane */
                acc_lf = _mm_sub_epi8(acc_lf, is_lf);
                acc_crlf = _mm_sub_epi8(acc_crlf, _mm_and_si128(is_lf, _mm_cmpeq_epi8(before, vcr)));
            }
            c_cr += sum_octets(acc_cr);
            c_lf += sum_octets(acc_lf);
            c_crlf += sum_octets(acc_crlf);
        }
    }
#endif
    for (; i < n; i++) {
        unsigned char c = s[i];
        if (c == '\r') {
            c_cr++;
        } else if (c == '\n') {
            c_lf++;
            c_crlf += i > 0 && s[i - 1] == '\r';
        }
    }
    *crlf = c_crlf;
    *cr = c_cr;
    *lf = c_lf;
}

/* The first i >= start where the m octets of p (m is 2 or 3) are at s[i..i+m-1], or -1. */
static Py_ssize_t find_short(const unsigned char *s, Py_ssize_t n, const unsigned char *p, Py_ssize_t m,
                             Py_ssize_t start)
{
    Py_ssize_t i = start;
#if defined(__SSE2__)
    const __m128i v0 = _mm_set1_epi8((char)p[0]), v1 = _mm_set1_epi8((char)p[1]);
    const __m128i v2 = _mm_set1_epi8((char)p[m - 1]);
    /* the blocks at i, i + 1 and i + m - 1: every load ends inside the buffer */
    for (; i + 15 + m <= n; i += 16) {
        __m128i hit = _mm_and_si128(_mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(s + i)), v0),
                                    _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(s + i + 1)), v1));
        if (m == 3)
            hit = _mm_and_si128(hit, _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(s + i + 2)), v2));
        unsigned mask = (unsigned)_mm_movemask_epi8(hit);
        if (mask)
            return i + __builtin_ctz(mask);
    }
#endif
    for (; i + m <= n; i++) {
        if (s[i] == p[0] && s[i + 1] == p[1] && s[i + m - 1] == p[m - 1])
            return i;
    }
    return -1;
}

static PyObject *py_line_ends(PyObject *self, PyObject *arg)
{
    Py_buffer view;
    Py_ssize_t crlf, cr, lf;
    (void)self;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    count_line_ends((const unsigned char *)view.buf, view.len, &crlf, &cr, &lf);
    PyBuffer_Release(&view);
    return Py_BuildValue("(nnn)", crlf, cr, lf);
}

static PyObject *py_find_short(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view, pattern;
    Py_ssize_t start, found;
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "find_short(data, pattern, start) takes 3 arguments");
        return NULL;
    }
    start = PyLong_AsSsize_t(args[2]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    if (start < 0) {
        PyErr_SetString(PyExc_ValueError, "start must not be negative");
        return NULL;
    }
    if (PyObject_GetBuffer(args[1], &pattern, PyBUF_SIMPLE) < 0)
        return NULL;
    if (pattern.len != 2 && pattern.len != 3) {
        PyBuffer_Release(&pattern);
        PyErr_SetString(PyExc_ValueError, "pattern must be two or three octets");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&pattern);
        return NULL;
    }
    found = start >= view.len ? -1
        : find_short((const unsigned char *)view.buf, view.len, (const unsigned char *)pattern.buf, pattern.len,
                     start);
    PyBuffer_Release(&view);
    PyBuffer_Release(&pattern);
    return PyLong_FromSsize_t(found);
}

/* data without its "\r" octets: CRLF line ends become LF (what a Maildir file holds).
 * memchr finds each CR (the C library reads a block a step on every platform), memcpy
 * moves what lies between. The GIL is kept: ~14 us for 100 KB, where taking it back after
 * a release could wait for another thread's switch interval (5 ms). */
static PyObject *py_strip_cr(PyObject *self, PyObject *arg)
{
    Py_buffer view;
    PyObject *out;
    (void)self;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    out = PyBytes_FromStringAndSize(NULL, view.len);
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    const unsigned char *s = (const unsigned char *)view.buf;
    char *d = PyBytes_AS_STRING(out);
    Py_ssize_t n = view.len, i = 0, w = 0;
    while (i < n) {
        const unsigned char *cr = memchr(s + i, '\r', (size_t)(n - i));
        Py_ssize_t end = cr != NULL ? cr - s : n;
        memcpy(d + w, s + i, (size_t)(end - i));
        w += end - i;
        i = end + 1;
    }
    PyBuffer_Release(&view);
    if (w != n && _PyBytes_Resize(&out, w) < 0)
        return NULL;
    return out;
}

static PyMethodDef methods[] = {
    {"line_ends", py_line_ends, METH_O, "line_ends(data) -> (crlf, cr, lf): counts of \\r\\n, \\r and \\n."},
    {"find_short", (PyCFunction)(void (*)(void))py_find_short, METH_FASTCALL,
     "find_short(data, pattern, start) -> data.find(pattern, start) for a pattern of 2 or 3 octets, start >= 0."},
    {"strip_cr", py_strip_cr, METH_O, "strip_cr(data) -> bytes: data without its \\r octets."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kanmon._scan", "The DATA scans in C (kanmon/scan.py has them in Python).", -1, methods,
};

PyMODINIT_FUNC PyInit__scan(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    /* Without SSE2 the loops above go one octet at a time, no faster than CPython's:
     * kanmon/scan.py then keeps its Python definitions. */
#if defined(__SSE2__)
    if (PyModule_AddIntConstant(m, "VECTOR", 1) < 0) {
#else
    if (PyModule_AddIntConstant(m, "VECTOR", 0) < 0) {
#endif
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
