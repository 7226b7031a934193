/*
 * netfilter.dns._scan: the resolver's per-packet reads, in C.
 *
 * A clean query is forwarded as it came, so all the resolver needs from it is the
 * question's name (to check), its end (to match the answer) and the client's UDP
 * size (to fit the answer); from the answer, only whether it holds a CNAME (whose
 * target must be checked too). Python's version of both (wire.py) costs several
 * microseconds per packet, which is most of what filtering adds to forwarding.
 *
 * Both functions only recognise the common, well-formed case and say "not this"
 * (None / False) for anything else; the caller then takes the full Python path of
 * wire.py, which answers FORMERR, BADVERS and the rest. So this code never has to
 * decide an error, only to be sure of what it accepts. The tests hold it equal to
 * the Python reference (wire.scan_question, wire.answer_is_plain) on real and
 * mutated packets.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define MAX_NAME 255
#define TYPE_OPT 41
#define TYPE_CNAME 5

static inline unsigned u16(const unsigned char *p) { return (unsigned)p[0] << 8 | p[1]; }

/* Plain label characters: letters, digits, '-', '_' (as wire.py's _PLAIN_NAME). */
static unsigned char plain[256];

static void init_tables(void) {
    for (int c = 'a'; c <= 'z'; c++) plain[c] = (unsigned char)c;
    for (int c = 'A'; c <= 'Z'; c++) plain[c] = (unsigned char)(c - 'A' + 'a');
    for (int c = '0'; c <= '9'; c++) plain[c] = (unsigned char)c;
    plain['-'] = '-';
    plain['_'] = '_';
}

/*
 * question(data) -> (name, qtype, question_end, udp_size) | None
 *
 * Accepted: a standard query (QR 0, opcode 0) with one question, no answer or
 * authority records, and either no additional record or exactly one OPT record (root
 * owner, EDNS version 0, well-formed options) that ends the message; the name made
 * of plain labels, no compression, at most 255 octets, not the root; class IN.
 * The name comes back lowercase, without a trailing dot.
 */
static PyObject *py_question(PyObject *self, PyObject *arg) {
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "question() takes bytes");
        return NULL;
    }
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(arg);
    Py_ssize_t size = PyBytes_GET_SIZE(arg);
    if (size < 12 + 1 + 4) Py_RETURN_NONE;
    if (d[2] & 0xF8) Py_RETURN_NONE; /* QR, or an opcode other than QUERY */
    if (u16(d + 4) != 1 || u16(d + 6) || u16(d + 8)) Py_RETURN_NONE;
    unsigned arcount = u16(d + 10);
    if (arcount > 1) Py_RETURN_NONE;

    char name[MAX_NAME];
    Py_ssize_t at = 12, out = 0;
    for (;;) {
        if (at >= size) Py_RETURN_NONE;
        unsigned count = d[at];
        if (count == 0) break;
        if (count > 63) Py_RETURN_NONE; /* a pointer or an unknown label type */
        if (at + 1 + (Py_ssize_t)count > size) Py_RETURN_NONE;
        if (out) name[out++] = '.';
        if (out + count > MAX_NAME - 2) Py_RETURN_NONE; /* wire form over 255 octets */
        for (unsigned i = 1; i <= count; i++) {
            unsigned char c = plain[d[at + i]];
            if (!c) Py_RETURN_NONE;
            name[out++] = (char)c;
        }
        at += 1 + count;
    }
    if (out == 0) Py_RETURN_NONE; /* the root */
    at += 1;
    if (at + 4 > size) Py_RETURN_NONE;
    unsigned qtype = u16(d + at), qclass = u16(d + at + 2);
    if (qclass != 1) Py_RETURN_NONE;
    Py_ssize_t question_end = at + 4;
    unsigned udp_size = 512;
    if (arcount == 0) {
        if (question_end != size) Py_RETURN_NONE;
    } else {
        const unsigned char *opt = d + question_end;
        if (question_end + 11 > size || opt[0] != 0 || u16(opt + 1) != TYPE_OPT)
            Py_RETURN_NONE;
        if (opt[6] != 0) Py_RETURN_NONE; /* EDNS version */
        Py_ssize_t start = question_end + 11, end = start + u16(opt + 9);
        if (end != size) Py_RETURN_NONE;
        while (start < end) {
            if (start + 4 > end) Py_RETURN_NONE;
            start += 4 + u16(d + start + 2);
        }
        if (start != end) Py_RETURN_NONE;
        udp_size = u16(opt + 3);
        if (udp_size < 512) udp_size = 512;
    }
    return Py_BuildValue("(s#Inl)", name, (Py_ssize_t)out, qtype, question_end,
                         (long)udp_size);
}

/*
 * answer_is_plain(answer, question_end) -> bool
 *
 * True when the answer section, read from `question_end` (the caller has checked that
 * the answer repeats the question), is well-formed and holds no CNAME record. Owner
 * names may be compressed; each must stay inside the message.
 */
static PyObject *py_answer_is_plain(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "answer_is_plain(bytes, int)");
        return NULL;
    }
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    Py_ssize_t at = PyLong_AsSsize_t(args[1]);
    if (at == -1 && PyErr_Occurred()) return NULL;
    if (size < 12 || at < 12 || at > size) Py_RETURN_FALSE;
    unsigned ancount = u16(d + 6);
    for (unsigned record = 0; record < ancount; record++) {
        /* The owner: labels, ended by the root label or by one pointer backwards. */
        for (int labels = 0;; labels++) {
            if (at >= size || labels > 127) Py_RETURN_FALSE;
            unsigned count = d[at];
            if (count == 0) {
                at += 1;
                break;
            }
            if ((count & 0xC0) == 0xC0) {
                if (at + 2 > size || (Py_ssize_t)(((count & 0x3F) << 8) | d[at + 1]) >= at)
                    Py_RETURN_FALSE;
                at += 2;
                break;
            }
            if (count > 63) Py_RETURN_FALSE;
            at += 1 + count;
        }
        if (at + 10 > size) Py_RETURN_FALSE;
        unsigned rtype = u16(d + at);
        at += 10 + u16(d + at + 8);
        if (at > size) Py_RETURN_FALSE;
        if (rtype == TYPE_CNAME) Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

static PyMethodDef methods[] = {
    {"question", py_question, METH_O,
     "(name, qtype, question_end, udp_size) of a common, well-formed query, else None."},
    {"answer_is_plain", (PyCFunction)(void (*)(void))py_answer_is_plain, METH_FASTCALL,
     "True when the answer section is well-formed and holds no CNAME."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_scan",
                                    "The resolver's per-packet reads, in C.", -1, methods};

PyMODINIT_FUNC PyInit__scan(void) {
    init_tables();
    return PyModule_Create(&module);
}
