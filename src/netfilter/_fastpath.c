/*
 * netfilter._fastpath: the hot loop of matching, in C.
 *
 * For every (host, tail) pair: SHA-256 of host + tail, then the two-word Bloom probe
 * of netfilter/bloom.py. Returns only the pairs the filter may contain, with their
 * digests; Python confirms them by exact look-up. The pure-Python path in matcher.py
 * does the same and is used when this module is not built; the tests hold the two
 * equal. SHA-256 follows FIPS 180-4 and is checked against hashlib in the tests.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define HAVE_SHANI_CODE 1
#endif

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void compress(uint32_t h[8], const unsigned char *block) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)block[4 * i] << 24 | (uint32_t)block[4 * i + 1] << 16 |
               (uint32_t)block[4 * i + 2] << 8 | (uint32_t)block[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = hh + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
}

#ifdef HAVE_SHANI_CODE
/* The same compression with the CPU's SHA extensions (chosen at import when present):
 * four rounds per sha256rnds2 pair, the schedule by sha256msg1/msg2. */
__attribute__((target("sha,sse4.1"))) static void compress_shani(uint32_t h[8],
                                                                   const unsigned char *block) {
    const __m128i mask = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i tmp = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&h[0]), 0xB1);
    __m128i state1 = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&h[4]), 0x1B);
    __m128i state0 = _mm_alignr_epi8(tmp, state1, 8);    /* ABEF */
    state1 = _mm_blend_epi16(state1, tmp, 0xF0);         /* CDGH */
    const __m128i abef = state0, cdgh = state1;
    __m128i msg[4];
    for (int i = 0; i < 4; i++)
        msg[i] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(block + 16 * i)), mask);
    for (int i = 0; i < 16; i++) {
        __m128i words = _mm_add_epi32(msg[i & 3], _mm_loadu_si128((const __m128i *)&K[4 * i]));
        state1 = _mm_sha256rnds2_epu32(state1, state0, words);
        if (i < 12) {  /* W[4i+16 .. 4i+19] replaces W[4i .. 4i+3], now used */
            __m128i next = _mm_add_epi32(_mm_sha256msg1_epu32(msg[i & 3], msg[(i + 1) & 3]),
                                         _mm_alignr_epi8(msg[(i + 3) & 3], msg[(i + 2) & 3], 4));
            msg[i & 3] = _mm_sha256msg2_epu32(next, msg[(i + 3) & 3]);
        }
        state0 = _mm_sha256rnds2_epu32(state0, state1, _mm_shuffle_epi32(words, 0x0E));
    }
    state0 = _mm_add_epi32(state0, abef);
    state1 = _mm_add_epi32(state1, cdgh);
    tmp = _mm_shuffle_epi32(state0, 0x1B);              /* FEBA */
    state1 = _mm_shuffle_epi32(state1, 0xB1);           /* DCHG */
    _mm_storeu_si128((__m128i *)&h[0], _mm_blend_epi16(tmp, state1, 0xF0));  /* DCBA */
    _mm_storeu_si128((__m128i *)&h[4], _mm_alignr_epi8(state1, tmp, 8));     /* HGFE */
}

static int cpu_has_sha(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(b & (1u << 29))) return 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    return (c & bit_SSE4_1) && (c & bit_SSSE3);
}
#endif

static void (*compress_block)(uint32_t h[8], const unsigned char *block) = compress;

/* SHA-256 of the concatenation of up to three pieces (no copies needed). */
static void sha256_parts(const unsigned char *const *parts, const size_t *lens, int n,
                         unsigned char out[32]) {
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                     0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    unsigned char block[64];
    size_t fill = 0, total = 0;
    for (int p = 0; p < n; p++) {
        const unsigned char *data = parts[p];
        size_t len = lens[p];
        total += len;
        while (len) {
            size_t take = 64 - fill < len ? 64 - fill : len;
            memcpy(block + fill, data, take);
            fill += take; data += take; len -= take;
            if (fill == 64) { compress_block(h, block); fill = 0; }
        }
    }
    uint64_t bits = (uint64_t)total * 8;
    block[fill++] = 0x80;
    if (fill > 56) { memset(block + fill, 0, 64 - fill); compress_block(h, block); fill = 0; }
    memset(block + fill, 0, 56 - fill);
    for (int i = 0; i < 8; i++) block[56 + i] = (unsigned char)(bits >> (56 - 8 * i));
    compress_block(h, block);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (unsigned char)(h[i] >> 24); out[4 * i + 1] = (unsigned char)(h[i] >> 16);
        out[4 * i + 2] = (unsigned char)(h[i] >> 8); out[4 * i + 3] = (unsigned char)h[i];
    }
}

/* The digest of an expression: SHA-256, or HMAC-SHA256 (RFC 2104) with a list key
 * whose padded inner and outer blocks the caller prepared. */
static void digest_of(const unsigned char *a, size_t alen, const unsigned char *b,
                      size_t blen, const unsigned char *ipad, const unsigned char *opad,
                      unsigned char out[32]) {
    if (!ipad) {
        const unsigned char *parts[2] = {a, b};
        size_t lens[2] = {alen, blen};
        sha256_parts(parts, lens, 2, out);
        return;
    }
    unsigned char inner[32];
    const unsigned char *iparts[3] = {ipad, a, b};
    size_t ilens[3] = {64, alen, blen};
    sha256_parts(iparts, ilens, 3, inner);
    const unsigned char *oparts[2] = {opad, inner};
    size_t olens[2] = {64, 32};
    sha256_parts(oparts, olens, 2, out);
}

static PyObject *py_sha256(PyObject *self, PyObject *args) {
    Py_buffer data;
    unsigned char out[32];
    if (!PyArg_ParseTuple(args, "y*", &data)) return NULL;
    const unsigned char *parts[1] = {data.buf};
    size_t lens[1] = {(size_t)data.len};
    sha256_parts(parts, lens, 1, out);
    PyBuffer_Release(&data);
    return PyBytes_FromStringAndSize((const char *)out, 32);
}

static inline uint32_t be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Filter(words, first, second, key): the Bloom words, the two pattern tables and the
 * list key, held (buffers acquired) once; .maybe(hosts, tails) is the hot call. */
typedef struct {
    PyObject_HEAD
    Py_buffer words, first, second;
    unsigned char ipad[64], opad[64];
    int keyed;
} Filter;

static void filter_dealloc(Filter *self) {
    if (self->words.obj) PyBuffer_Release(&self->words);
    if (self->first.obj) PyBuffer_Release(&self->first);
    if (self->second.obj) PyBuffer_Release(&self->second);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int filter_init(Filter *self, PyObject *args, PyObject *kwds) {
    Py_buffer key;
    if (!PyArg_ParseTuple(args, "y*y*y*y*", &self->words, &self->first, &self->second, &key))
        return -1;
    int ok = self->words.len >= 8 && self->first.len == 4096 * 8 &&
             self->second.len == 4096 * 8;
    self->keyed = key.len > 0;
    if (self->keyed) {  /* HMAC: the key, hashed when longer than a block, padded */
        unsigned char k0[64] = {0};
        if (key.len > 64) {
            const unsigned char *parts[1] = {key.buf};
            size_t lens[1] = {(size_t)key.len};
            sha256_parts(parts, lens, 1, k0);
        } else {
            memcpy(k0, key.buf, (size_t)key.len);
        }
        for (int i = 0; i < 64; i++) {
            self->ipad[i] = k0[i] ^ 0x36;
            self->opad[i] = k0[i] ^ 0x5c;
        }
    }
    PyBuffer_Release(&key);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "_fastpath: bad filter buffers");
        return -1;
    }
    return 0;
}

static PyObject *filter_maybe(Filter *self, PyObject *args) {
    PyObject *hosts, *tails;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &hosts, &PyList_Type, &tails))
        return NULL;
    const unsigned char *ip = self->keyed ? self->ipad : NULL;
    const unsigned char *op = self->keyed ? self->opad : NULL;
    const uint64_t *w = self->words.buf, *t1 = self->first.buf, *t2 = self->second.buf;
    uint64_t nwords = (uint64_t)self->words.len / 8;
    PyObject *result = PyList_New(0);
    if (!result) return NULL;
    Py_ssize_t nh = PyList_GET_SIZE(hosts), nt = PyList_GET_SIZE(tails);
    for (Py_ssize_t i = 0; i < nh; i++) {
        Py_ssize_t hl;
        const char *host = PyUnicode_AsUTF8AndSize(PyList_GET_ITEM(hosts, i), &hl);
        if (!host) { Py_DECREF(result); return NULL; }
        for (Py_ssize_t j = 0; j < nt; j++) {
            Py_ssize_t tl;
            const char *tail = PyUnicode_AsUTF8AndSize(PyList_GET_ITEM(tails, j), &tl);
            if (!tail) { Py_DECREF(result); return NULL; }
            unsigned char d[32];
            digest_of((const unsigned char *)host, (size_t)hl, (const unsigned char *)tail,
                      (size_t)tl, ip, op, d);
            uint64_t m = t1[((uint32_t)d[4] << 8 | d[5]) & 4095];
            if ((w[((uint64_t)be32(d) * nwords) >> 32] & m) != m) continue;
            m = t2[((uint32_t)d[10] << 8 | d[11]) & 4095];
            if ((w[((uint64_t)be32(d + 6) * nwords) >> 32] & m) != m) continue;
            PyObject *item = Py_BuildValue("(nny#)", i, j, (const char *)d, (Py_ssize_t)32);
            if (!item || PyList_Append(result, item) < 0) {
                Py_XDECREF(item); Py_DECREF(result); return NULL;
            }
            Py_DECREF(item);
        }
    }
    return result;
}

static PyMethodDef filter_methods[] = {
    {"maybe", (PyCFunction)filter_maybe, METH_VARARGS,
     "maybe(hosts, tails): (i, j, digest) of each host+tail the filter may hold."},
    {NULL, NULL, 0, NULL}};

static PyTypeObject FilterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "netfilter._fastpath.Filter",
    .tp_basicsize = sizeof(Filter),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Filter(words, first, second, key): the hashing and Bloom probe of matcher.py",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)filter_init,
    .tp_dealloc = (destructor)filter_dealloc,
    .tp_methods = filter_methods,
};

static PyObject *py_backend(PyObject *self, PyObject *args);

static PyMethodDef methods[] = {
    {"backend", py_backend, METH_NOARGS, "Which SHA-256 compression runs: sha-ni|portable."},
    {"sha256", py_sha256, METH_VARARGS, "SHA-256 of bytes (for the tests)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastpath",
                                    "The hot loop of matching, in C.", -1, methods};

static PyObject *py_backend(PyObject *self, PyObject *args) {
    return PyUnicode_FromString(compress_block == compress ? "portable" : "sha-ni");
}

PyMODINIT_FUNC PyInit__fastpath(void) {
#ifdef HAVE_SHANI_CODE
    /* NETFILTER_PORTABLE_SHA=1 keeps the portable code (the tests check both). */
    const char *portable = getenv("NETFILTER_PORTABLE_SHA");
    if (!(portable && *portable == '1') && cpu_has_sha()) compress_block = compress_shani;
#endif
    if (PyType_Ready(&FilterType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&FilterType);
    if (PyModule_AddObject(m, "Filter", (PyObject *)&FilterType) < 0) {
        Py_DECREF(&FilterType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
