/*
 * netfilter.dns._hotpath: the resolver's per-packet work for clean queries, in C.
 *
 * A clean query is forwarded as it came, so all the resolver needs from it is the
 * question's name (to check), its end (to match the answer) and the client's UDP
 * size (to fit the answer); from the answer, only whether it holds a CNAME (whose
 * target must be checked too). Done in Python per packet, that work costs several
 * times what forwarding itself costs, so:
 *
 * - question() and answer_is_plain() read exactly that, and recognise only the
 *   common, well-formed case. For anything else they say "not this" (None / False)
 *   and the caller takes the full Python path of wire.py, which answers FORMERR,
 *   BADVERS and the rest. So this code never has to decide an error, only to be
 *   sure of what it accepts. The tests hold both equal to their Python twins
 *   (wire.py_scan_question, wire.py_answer_is_plain) on real and mutated packets.
 *
 * - Relay moves packets between one listening UDP socket and one connected upstream
 *   socket in batches (recvmmsg/sendmmsg: one system call for up to 32 packets, where
 *   a per-packet event loop makes four per query). A query takes the relay only when
 *   question() accepts it and the engine's host cache says its name matches nothing;
 *   an answer goes back only when it fits the client's UDP size and holds no CNAME.
 *   Everything else is handed to Python with the packet and the client's address
 *   (server.py), which decides, records and answers. Queries past their deadline
 *   are handed back too, for Python to retry on the next upstream or SERVFAIL.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>

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
typedef struct {
    char name[MAX_NAME];
    Py_ssize_t name_length;
    unsigned qtype;
    Py_ssize_t question_end;
    unsigned udp_size;
} Question;

/* 1 when `d` is a common, well-formed query (see above), its fields in `q`; else 0. */
static int scan_question(const unsigned char *d, Py_ssize_t size, Question *q) {
    if (size < 12 + 1 + 4) return 0;
    if (d[2] & 0xF8) return 0; /* QR, or an opcode other than QUERY */
    if (u16(d + 4) != 1 || u16(d + 6) || u16(d + 8)) return 0;
    unsigned arcount = u16(d + 10);
    if (arcount > 1) return 0;

    Py_ssize_t at = 12, out = 0;
    for (;;) {
        if (at >= size) return 0;
        unsigned count = d[at];
        if (count == 0) break;
        if (count > 63) return 0; /* a pointer or an unknown label type */
        if (at + 1 + (Py_ssize_t)count > size) return 0;
        if (out) q->name[out++] = '.';
        if (out + count > MAX_NAME - 2) return 0; /* wire form over 255 octets */
        for (unsigned i = 1; i <= count; i++) {
            unsigned char c = plain[d[at + i]];
            if (!c) return 0;
            q->name[out++] = (char)c;
        }
        at += 1 + count;
    }
    if (out == 0) return 0; /* the root */
    at += 1;
    if (at + 4 > size) return 0;
    unsigned qtype = u16(d + at), qclass = u16(d + at + 2);
    if (qclass != 1) return 0;
    Py_ssize_t question_end = at + 4;
    unsigned udp_size = 512;
    if (arcount == 0) {
        if (question_end != size) return 0;
    } else {
        const unsigned char *opt = d + question_end;
        if (question_end + 11 > size || opt[0] != 0 || u16(opt + 1) != TYPE_OPT) return 0;
        if (opt[6] != 0) return 0; /* EDNS version */
        Py_ssize_t start = question_end + 11, end = start + u16(opt + 9);
        if (end != size) return 0;
        while (start < end) {
            if (start + 4 > end) return 0;
            start += 4 + u16(d + start + 2);
        }
        if (start != end) return 0;
        udp_size = u16(opt + 3);
        if (udp_size < 512) udp_size = 512;
    }
    q->name_length = out;
    q->qtype = qtype;
    q->question_end = question_end;
    q->udp_size = udp_size;
    return 1;
}

/* question(data) -> (name, qtype, question_end, udp_size) | None */
static PyObject *py_question(PyObject *Py_UNUSED(self), PyObject *arg) {
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "question() takes bytes");
        return NULL;
    }
    Question q;
    if (!scan_question((const unsigned char *)PyBytes_AS_STRING(arg), PyBytes_GET_SIZE(arg),
                       &q))
        Py_RETURN_NONE;
    return Py_BuildValue("(s#Inl)", q.name, q.name_length, q.qtype, q.question_end,
                         (long)q.udp_size);
}

/*
 * answer_is_plain(answer, question_end) -> bool
 *
 * True when the answer section, read from `question_end` (the caller has checked that
 * the answer repeats the question), is well-formed and holds no CNAME record. Owner
 * names may be compressed; each must stay inside the message.
 */
/* 1 when the answer section from `at` is well-formed and holds no CNAME; else 0. */
static int plain_answer(const unsigned char *d, Py_ssize_t size, Py_ssize_t at) {
    if (size < 12 || at < 12 || at > size) return 0;
    unsigned ancount = u16(d + 6);
    for (unsigned record = 0; record < ancount; record++) {
        /* The owner: labels, ended by the root label or by one pointer backwards. */
        for (int labels = 0;; labels++) {
            if (at >= size || labels > 127) return 0;
            unsigned count = d[at];
            if (count == 0) {
                at += 1;
                break;
            }
            if ((count & 0xC0) == 0xC0) {
                if (at + 2 > size || (Py_ssize_t)(((count & 0x3F) << 8) | d[at + 1]) >= at)
                    return 0;
                at += 2;
                break;
            }
            if (count > 63) return 0;
            at += 1 + count;
        }
        if (at + 10 > size) return 0;
        unsigned rtype = u16(d + at);
        at += 10 + u16(d + at + 8);
        if (at > size) return 0;
        if (rtype == TYPE_CNAME) return 0;
    }
    return 1;
}

/* answer_is_plain(answer, question_end) -> bool */
static PyObject *py_answer_is_plain(PyObject *Py_UNUSED(self), PyObject *const *args,
                                    Py_ssize_t nargs) {
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "answer_is_plain(bytes, int)");
        return NULL;
    }
    Py_ssize_t at = PyLong_AsSsize_t(args[1]);
    if (at == -1 && PyErr_Occurred()) return NULL;
    return PyBool_FromLong(plain_answer((const unsigned char *)PyBytes_AS_STRING(args[0]),
                                        PyBytes_GET_SIZE(args[0]), at));
}

/* ------------------------------------------------------------------ Relay */

#define BATCH 32          /* packets per recvmmsg / sendmmsg */
#define ROUNDS 8          /* batches per readiness callback, so one socket cannot starve */
#define PACKET 65536      /* a UDP payload always fits */
#define ID_TRIES 8        /* random ids tried before handing a query to Python */

typedef struct {
    double deadline;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    uint16_t question_end, udp_size, length;
    unsigned char query[]; /* as the client sent it (its id) */
} Entry;

typedef struct {
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    struct sockaddr_storage addrs[BATCH];
    unsigned char *buffers; /* BATCH x PACKET, for receiving */
} Batch;

typedef struct {
    PyObject_HEAD
    int client_fd, upstream_fd;
    double timeout;
    Py_ssize_t max_in_flight, in_flight;
    Entry **table; /* by the id sent upstream: 65536 slots */
    Batch in, out;
    Entry *sent[BATCH]; /* entries whose answers are in `out`, freed after sending */
    unsigned char random[4096];
    size_t random_at;
    unsigned long long relayed, handed_over, answered, mismatched, expired, send_failed;
} Relay;

static double now_monotonic(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t); /* the clock of Python's time.monotonic() */
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int batch_init(Batch *b) {
    b->buffers = PyMem_RawMalloc((size_t)BATCH * PACKET);
    if (b->buffers == NULL) return -1;
    return 0;
}

static void batch_for_receiving(Batch *b) {
    for (int i = 0; i < BATCH; i++) {
        b->iov[i].iov_base = b->buffers + (size_t)i * PACKET;
        b->iov[i].iov_len = PACKET;
        memset(&b->msgs[i].msg_hdr, 0, sizeof(struct msghdr));
        b->msgs[i].msg_hdr.msg_iov = &b->iov[i];
        b->msgs[i].msg_hdr.msg_iovlen = 1;
        b->msgs[i].msg_hdr.msg_name = &b->addrs[i];
        b->msgs[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_storage);
    }
}

static uint16_t random_id(Relay *r) {
    if (r->random_at + 2 > sizeof r->random) {
        if (getrandom(r->random, sizeof r->random, 0) != (ssize_t)sizeof r->random) {
            /* getrandom does not fail for 4096 bytes once the pool is ready; just in case,
               fall back to the clock mixed with the old bytes, never to a fixed id. */
            uint64_t t = (uint64_t)(now_monotonic() * 1e9);
            for (size_t i = 0; i < sizeof r->random; i++)
                r->random[i] ^= (unsigned char)(t >> (i % 8 * 8));
        }
        r->random_at = 0;
    }
    uint16_t id = (uint16_t)(r->random[r->random_at] << 8 | r->random[r->random_at + 1]);
    r->random_at += 2;
    return id;
}

static PyObject *address_tuple(const struct sockaddr_storage *addr) {
    char text[INET6_ADDRSTRLEN];
    if (addr->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)addr;
        inet_ntop(AF_INET6, &a->sin6_addr, text, sizeof text);
        return Py_BuildValue("(sHkk)", text, ntohs(a->sin6_port),
                             (unsigned long)ntohl(a->sin6_flowinfo),
                             (unsigned long)a->sin6_scope_id);
    }
    const struct sockaddr_in *a = (const struct sockaddr_in *)addr;
    inet_ntop(AF_INET, &a->sin_addr, text, sizeof text);
    return Py_BuildValue("(sH)", text, ntohs(a->sin_port));
}

/* Append (packet, address) to `list`; -1 with an exception set on failure. */
static int hand_over(PyObject *list, const unsigned char *data, Py_ssize_t size,
                     const struct sockaddr_storage *addr) {
    PyObject *item = Py_BuildValue("(y#N)", (const char *)data, size, address_tuple(addr));
    if (item == NULL) return -1;
    int failed = PyList_Append(list, item);
    Py_DECREF(item);
    return failed;
}

static int relay_init(Relay *r, PyObject *args, PyObject *kwds) {
    static char *keywords[] = {"client_fd", "upstream_fd", "timeout", "max_in_flight", NULL};
    r->max_in_flight = 30000;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iid|n", keywords, &r->client_fd,
                                     &r->upstream_fd, &r->timeout, &r->max_in_flight))
        return -1;
    if (r->max_in_flight < 1 || r->max_in_flight > 60000) {
        PyErr_SetString(PyExc_ValueError, "max_in_flight must be 1..60000");
        return -1;
    }
    if (r->table == NULL) {
        r->table = PyMem_RawCalloc(65536, sizeof(Entry *));
        if (r->table == NULL || batch_init(&r->in) < 0) {
            PyErr_NoMemory();
            return -1;
        }
    }
    r->random_at = sizeof r->random;
    return 0;
}

static void relay_dealloc(Relay *r) {
    if (r->table != NULL) {
        for (int i = 0; i < 65536; i++) PyMem_RawFree(r->table[i]);
        PyMem_RawFree(r->table);
    }
    PyMem_RawFree(r->in.buffers);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

/*
 * from_clients(host_cache) -> [(query, address), ...]
 *
 * Reads what the listening socket has (up to ROUNDS x BATCH packets). A query whose
 * name `host_cache` maps to None is sent upstream under a fresh random id; every
 * other packet is returned for the full path.
 */
static PyObject *relay_from_clients(Relay *r, PyObject *cache) {
    if (!PyDict_Check(cache)) {
        PyErr_SetString(PyExc_TypeError, "from_clients() takes the host cache (a dict)");
        return NULL;
    }
    PyObject *slow = PyList_New(0);
    if (slow == NULL) return NULL;
    Batch *in = &r->in;
    for (int round = 0; round < ROUNDS; round++) {
        batch_for_receiving(in);
        int n = recvmmsg(r->client_fd, in->msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) break; /* EAGAIN: drained; an error on a UDP listener: try later */
        double deadline = now_monotonic() + r->timeout;
        struct mmsghdr up[BATCH];
        struct iovec up_iov[BATCH];
        uint16_t up_ids[BATCH];
        int ups = 0;
        for (int i = 0; i < n; i++) {
            unsigned char *data = in->iov[i].iov_base;
            Py_ssize_t size = in->msgs[i].msg_len;
            const struct sockaddr_storage *addr = &in->addrs[i];
            Question q;
            int fast = 0;
            if (size <= 0xFFFF && r->in_flight < r->max_in_flight &&
                scan_question(data, size, &q)) {
                PyObject *name = PyUnicode_DecodeASCII(q.name, q.name_length, NULL);
                if (name == NULL) goto error;
                PyObject *match = PyDict_GetItemWithError(cache, name); /* borrowed */
                Py_DECREF(name);
                if (match == NULL && PyErr_Occurred()) goto error;
                fast = match == Py_None;
            }
            uint16_t id = 0;
            if (fast) {
                fast = 0;
                for (int t = 0; t < ID_TRIES; t++) {
                    id = random_id(r);
                    if (r->table[id] == NULL) {
                        fast = 1;
                        break;
                    }
                }
            }
            Entry *e = NULL;
            if (fast) {
                e = PyMem_RawMalloc(sizeof(Entry) + (size_t)size);
                if (e == NULL) fast = 0;
            }
            if (!fast) {
                if (hand_over(slow, data, size, addr) < 0) goto error;
                r->handed_over++;
                continue;
            }
            e->deadline = deadline;
            memcpy(&e->addr, addr, in->msgs[i].msg_hdr.msg_namelen);
            e->addrlen = in->msgs[i].msg_hdr.msg_namelen;
            e->question_end = (uint16_t)q.question_end;
            e->udp_size = (uint16_t)q.udp_size;
            e->length = (uint16_t)size;
            memcpy(e->query, data, (size_t)size);
            r->table[id] = e;
            r->in_flight++;
            data[0] = (unsigned char)(id >> 8); /* the id upstream sees */
            data[1] = (unsigned char)id;
            up_iov[ups].iov_base = data;
            up_iov[ups].iov_len = (size_t)size;
            memset(&up[ups].msg_hdr, 0, sizeof(struct msghdr));
            up[ups].msg_hdr.msg_iov = &up_iov[ups];
            up[ups].msg_hdr.msg_iovlen = 1;
            up_ids[ups++] = id;
        }
        int sent = 0;
        while (sent < ups) {
            int k = sendmmsg(r->upstream_fd, up + sent, (unsigned)(ups - sent), MSG_DONTWAIT);
            if (k <= 0) break;
            sent += k;
        }
        for (int i = sent; i < ups; i++) { /* not sent (a full buffer, an ICMP error): */
            Entry *e = r->table[up_ids[i]];  /* Python's pool tries the next upstream */
            r->table[up_ids[i]] = NULL;
            r->in_flight--;
            r->send_failed++;
            int failed = hand_over(slow, e->query, e->length, &e->addr);
            PyMem_RawFree(e);
            if (failed < 0) goto error;
        }
        r->relayed += (unsigned long long)sent;
        if (n < BATCH) break;
    }
    return slow;
error:
    Py_DECREF(slow);
    return NULL;
}

/*
 * from_upstream() -> ([(answer, query, address), ...], refused)
 *
 * Reads the upstream's answers. One that repeats its query's question, fits the
 * client's UDP size and holds no CNAME is sent to the client with the client's id;
 * the others (id restored) are returned for the full path with the query and the
 * client's address. Answers for no pending id, or with another question, are
 * dropped and counted. `refused`: the upstream socket reported an ICMP error.
 */
static PyObject *relay_from_upstream(Relay *r, PyObject *Py_UNUSED(ignored)) {
    PyObject *slow = PyList_New(0);
    if (slow == NULL) return NULL;
    int refused = 0;
    Batch *in = &r->in, *out = &r->out;
    for (int round = 0; round < ROUNDS; round++) {
        batch_for_receiving(in);
        int n = recvmmsg(r->upstream_fd, in->msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) {
            if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) refused = 1;
            break;
        }
        int outs = 0;
        for (int i = 0; i < n; i++) {
            unsigned char *data = in->iov[i].iov_base;
            Py_ssize_t size = in->msgs[i].msg_len;
            if (size < 12) {
                r->mismatched++;
                continue;
            }
            uint16_t id = (uint16_t)(data[0] << 8 | data[1]);
            Entry *e = r->table[id];
            if (e == NULL || size < e->question_end ||
                memcmp(data + 12, e->query + 12, (size_t)e->question_end - 12) != 0) {
                r->mismatched++; /* late, spoofed or foreign: the query stays pending */
                continue;
            }
            r->table[id] = NULL;
            r->in_flight--;
            data[0] = e->query[0];
            data[1] = e->query[1];
            if (size <= e->udp_size && (u16(data + 6) == 0 ||
                                        plain_answer(data, size, e->question_end))) {
                out->iov[outs].iov_base = data; /* sent before the next round reads */
                out->iov[outs].iov_len = (size_t)size;
                memset(&out->msgs[outs].msg_hdr, 0, sizeof(struct msghdr));
                out->msgs[outs].msg_hdr.msg_iov = &out->iov[outs];
                out->msgs[outs].msg_hdr.msg_iovlen = 1;
                out->msgs[outs].msg_hdr.msg_name = &e->addr;
                out->msgs[outs].msg_hdr.msg_namelen = e->addrlen;
                r->sent[outs++] = e;
                continue;
            }
            PyObject *item = Py_BuildValue("(y#y#N)", (const char *)data, size,
                                           (const char *)e->query, (Py_ssize_t)e->length,
                                           address_tuple(&e->addr));
            PyMem_RawFree(e);
            if (item == NULL || PyList_Append(slow, item) < 0) {
                Py_XDECREF(item);
                goto error;
            }
            Py_DECREF(item);
            r->handed_over++;
        }
        int sent = 0;
        while (sent < outs) {
            int k = sendmmsg(r->client_fd, out->msgs + sent, (unsigned)(outs - sent),
                             MSG_DONTWAIT);
            if (k <= 0) { /* the client's socket refused it: a lost UDP answer */
                r->send_failed++;
                sent++;
                continue;
            }
            sent += k;
        }
        for (int i = 0; i < outs; i++) PyMem_RawFree(r->sent[i]);
        r->answered += (unsigned long long)outs;
        if (n < BATCH) break;
    }
    return Py_BuildValue("(NO)", slow, refused ? Py_True : Py_False);
error:
    Py_DECREF(slow);
    return NULL;
}

/*
 * expired(all=False) -> [(query, address), ...]
 *
 * The queries past their deadline (every pending one with all=True), removed from
 * the relay, for Python to retry on the next upstream or answer SERVFAIL.
 */
static PyObject *relay_expired(Relay *r, PyObject *args, PyObject *kwds) {
    static char *keywords[] = {"all", NULL};
    int all = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|p", keywords, &all)) return NULL;
    PyObject *late = PyList_New(0);
    if (late == NULL) return NULL;
    if (r->in_flight == 0) return late;
    double now = now_monotonic();
    for (int id = 0; id < 65536; id++) {
        Entry *e = r->table[id];
        if (e == NULL || (!all && e->deadline > now)) continue;
        r->table[id] = NULL;
        r->in_flight--;
        r->expired++;
        int failed = hand_over(late, e->query, e->length, &e->addr);
        PyMem_RawFree(e);
        if (failed < 0) {
            Py_DECREF(late);
            return NULL;
        }
    }
    return late;
}

/* given_back: queries handed back by expired() (past their deadline, after an ICMP
   error, or at shutdown); Python counts what it then does with them. */
static PyObject *relay_counts(Relay *r, PyObject *Py_UNUSED(ignored)) {
    return Py_BuildValue("{sKsKsKsKsKsKsn}", "relayed", r->relayed, "handed_over",
                         r->handed_over, "answered", r->answered, "upstream_mismatch",
                         r->mismatched, "given_back", r->expired, "send_failed",
                         r->send_failed, "in_flight", r->in_flight);
}

static PyMethodDef relay_methods[] = {
    {"from_clients", (PyCFunction)relay_from_clients, METH_O,
     "Relay clean queries upstream; the other packets, with their address, for Python."},
    {"from_upstream", (PyCFunction)relay_from_upstream, METH_NOARGS,
     "Relay plain answers to their clients; ([(answer, query, address)], refused)."},
    {"expired", (PyCFunction)(void (*)(void))relay_expired, METH_VARARGS | METH_KEYWORDS,
     "Pending queries past their deadline (all of them with all=True), removed."},
    {"counts", (PyCFunction)relay_counts, METH_NOARGS, "Packet counters, and in flight."},
    {NULL, NULL, 0, NULL}};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "netfilter.dns._hotpath.Relay",
    .tp_basicsize = sizeof(Relay),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Moves clean queries and plain answers between a listening UDP socket "
              "and a connected upstream socket, in batches.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)relay_init,
    .tp_dealloc = (destructor)relay_dealloc,
    .tp_methods = relay_methods,
};

static PyMethodDef methods[] = {
    {"question", py_question, METH_O,
     "(name, qtype, question_end, udp_size) of a common, well-formed query, else None."},
    {"answer_is_plain", (PyCFunction)(void (*)(void))py_answer_is_plain, METH_FASTCALL,
     "True when the answer section is well-formed and holds no CNAME."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_hotpath",
                                    "The resolver's per-packet work for clean queries, in C.",
                                    -1, methods};

PyMODINIT_FUNC PyInit__hotpath(void) {
    init_tables();
    if (PyType_Ready(&RelayType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&RelayType);
    if (PyModule_AddObject(m, "Relay", (PyObject *)&RelayType) < 0) {
        Py_DECREF(&RelayType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
