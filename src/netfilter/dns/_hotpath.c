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
 *
 * - The relay also answers from two bounded caches (see "answer caches" below): the
 *   block answers Python built (their blocks counted per client for Python to record)
 *   and upstream answers, both emptied whenever the engine's host cache is replaced
 *   (a list swap). Every byte read from a packet is bounds-checked; what the caches
 *   cannot take whole is simply not cached.
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
    unsigned form; /* FORM_* bits: what of the query, beyond its question, shapes an answer */
} Question;

/* What a cached answer's key holds beyond the question: an answer fits a query only when
   these agree (an OPT record only for an EDNS query, DO mirrored, the EDE form of a
   block answer; RD, CD and AD change what an upstream answers). */
#define FORM_EDNS 0x01
#define FORM_DO 0x02
#define FORM_EDE 0x04 /* the query carries an EDE option: structured-dns-error text */
#define FORM_RD 0x08
#define FORM_CD 0x10
#define FORM_AD 0x20
#define FORM_UNCACHED 0x40 /* a client subnet option: its answer may be the subnet's own */
#define EDE_OPTION 15
#define ECS_OPTION 8

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
    unsigned form = (d[2] & 0x01 ? FORM_RD : 0) | (d[3] & 0x10 ? FORM_CD : 0) |
                    (d[3] & 0x20 ? FORM_AD : 0);
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
            if (u16(d + start) == EDE_OPTION) form |= FORM_EDE;
            if (u16(d + start) == ECS_OPTION) form |= FORM_UNCACHED;
            start += 4 + u16(d + start + 2);
        }
        if (start != end) return 0;
        udp_size = u16(opt + 3);
        if (udp_size < 512) udp_size = 512;
        form |= FORM_EDNS | (opt[7] & 0x80 ? FORM_DO : 0);
    }
    q->form = form;
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

/* ------------------------------------------------------------------ answer caches
 *
 * Two bounded caches of whole answers, each served by the relay with the client's id,
 * its RD/CD bits and its question (the letter case it sent) patched in:
 *
 * - block answers: built by Python once per (name, qtype, form) under the lists in
 *   force (server.py decides and records the first), kept with a token Python gave;
 *   each answer served from here is counted per (token, client) for Python to record
 *   (block_counts()), so the audit log's counts stay exact;
 * - upstream answers (dns.cache_size entries, 0: off): positive and negative (RFC 2308,
 *   the SOA's minimum), TTLs decremented as they age.
 *
 * Both are emptied whenever the engine's host cache is another object than the one
 * seen last (a list swap makes a new one), so a name that turns blocked is never
 * served from them. Each is a segmented LRU: a new entry starts on probation and is
 * promoted to the protected segment when it is asked for again; room is made at the
 * probation end first. A flood of names asked for once (random subdomains) thus only
 * churns the probation segment and never evicts the hot set, and the entry count, as
 * each entry's size (CACHE_MAX_ANSWER), is bounded.
 */

#define CACHE_MAX_ANSWER 1232 /* bytes; larger answers are not cached */
#define CACHE_MAX_TTLS 48     /* records per cached answer */
#define CACHE_MAX_TTL 86400
#define CACHE_MAX_NEGATIVE_TTL 3600 /* as Unbound's cache-max-negative-ttl */
#define KEY_MAX (MAX_NAME + 4 + 1)  /* the question (name lowercased, type, class), form */
#define TYPE_SOA 6

typedef struct CacheEntry {
    struct CacheEntry *chain;       /* next in its hash bucket */
    struct CacheEntry *prev, *next; /* in its segment, most recently used first */
    Py_hash_t hash;
    PyObject *token; /* block answers: Python's token, handed back with the counts */
    double stored;   /* monotonic seconds */
    uint32_t ttl;    /* seconds it may be served from `stored` */
    uint16_t key_length, length, ttls;
    uint8_t segment; /* 0 probation, 1 protected */
    uint16_t ttl_at[CACHE_MAX_TTLS]; /* offsets of the TTL fields to age */
    unsigned char data[];            /* key, then the answer */
} CacheEntry;

typedef struct {
    CacheEntry **buckets; /* NULL: the cache is off */
    size_t mask, capacity, protected_capacity;
    CacheEntry *head[2], *tail[2];
    size_t size[2];
    unsigned long long hits, inserted, evicted, expired;
} Cache;

static int cache_init(Cache *c, size_t capacity) {
    memset(c, 0, sizeof *c);
    if (capacity == 0) return 0;
    size_t n = 16;
    while (n < capacity) n <<= 1;
    c->buckets = PyMem_RawCalloc(n, sizeof(CacheEntry *));
    if (c->buckets == NULL) return -1;
    c->mask = n - 1;
    c->capacity = capacity;
    c->protected_capacity = capacity - capacity / 4; /* a quarter stays for newcomers */
    return 0;
}

static void segment_unlink(Cache *c, CacheEntry *e) {
    if (e->prev) e->prev->next = e->next; else c->head[e->segment] = e->next;
    if (e->next) e->next->prev = e->prev; else c->tail[e->segment] = e->prev;
    c->size[e->segment]--;
}

static void segment_push(Cache *c, CacheEntry *e, uint8_t segment) {
    e->segment = segment;
    e->prev = NULL;
    e->next = c->head[segment];
    if (e->next) e->next->prev = e; else c->tail[segment] = e;
    c->head[segment] = e;
    c->size[segment]++;
}

static void cache_remove(Cache *c, CacheEntry *e) {
    CacheEntry **link = &c->buckets[(size_t)e->hash & c->mask];
    while (*link != e) link = &(*link)->chain;
    *link = e->chain;
    segment_unlink(c, e);
    Py_XDECREF(e->token);
    PyMem_RawFree(e);
}

static void cache_clear(Cache *c) {
    for (int s = 0; s < 2; s++)
        while (c->head[s]) cache_remove(c, c->head[s]);
}

static void cache_free(Cache *c) {
    if (c->buckets == NULL) return;
    cache_clear(c);
    PyMem_RawFree(c->buckets);
    c->buckets = NULL;
}

static size_t cache_entries(const Cache *c) { return c->size[0] + c->size[1]; }

static CacheEntry *cache_find(Cache *c, const unsigned char *key, size_t key_length,
                              Py_hash_t hash) {
    for (CacheEntry *e = c->buckets[(size_t)hash & c->mask]; e; e = e->chain)
        if (e->hash == hash && e->key_length == key_length &&
            memcmp(e->data, key, key_length) == 0)
            return e;
    return NULL;
}

/* Asked for again: on probation, promoted (the protected segment's least used entry,
   when it is full, goes back on probation); protected, to the front. */
static void cache_touch(Cache *c, CacheEntry *e) {
    segment_unlink(c, e);
    segment_push(c, e, 1);
    if (c->size[1] > c->protected_capacity) {
        CacheEntry *old = c->tail[1];
        segment_unlink(c, old);
        segment_push(c, old, 0);
    }
}

/* A new entry on probation (replacing one with the same key), room made first; NULL
   when out of memory. The caller fills ttl_at; `token` is taken as a new reference. */
static CacheEntry *cache_insert(Cache *c, const unsigned char *key, size_t key_length,
                                Py_hash_t hash, const unsigned char *answer, size_t length,
                                PyObject *token) {
    CacheEntry *old = cache_find(c, key, key_length, hash);
    if (old) cache_remove(c, old);
    while (cache_entries(c) >= c->capacity) {
        cache_remove(c, c->tail[c->tail[0] ? 0 : 1]);
        c->evicted++;
    }
    CacheEntry *e = PyMem_RawMalloc(sizeof(CacheEntry) + key_length + length);
    if (e == NULL) return NULL;
    e->hash = hash;
    e->key_length = (uint16_t)key_length;
    e->length = (uint16_t)length;
    e->ttls = 0;
    e->ttl = 0;
    e->stored = 0;
    memcpy(e->data, key, key_length);
    memcpy(e->data + key_length, answer, length);
    Py_XINCREF(token);
    e->token = token;
    CacheEntry **bucket = &c->buckets[(size_t)hash & c->mask];
    e->chain = *bucket;
    *bucket = e;
    segment_push(c, e, 0);
    c->inserted++;
    return e;
}

/* The key of a query's answers: its question with the name lowercased (the scan has
   checked it: plain labels, so length octets are below 'A'), then the form bits that
   matter to this cache. Returns the key's length. */
static size_t answer_key(const unsigned char *d, Py_ssize_t question_end, unsigned form,
                         unsigned char *key) {
    size_t n = (size_t)question_end - 12;
    for (size_t i = 0; i < n; i++) {
        unsigned char b = d[12 + i];
        key[i] = (i < n - 4 && b >= 'A' && b <= 'Z') ? (unsigned char)(b + 32) : b;
    }
    key[n] = (unsigned char)form;
    return n + 1;
}

static uint32_t u32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put_u32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* Past one owner name at `at` (labels, then the root or one pointer, not followed);
   -1 when it runs out of the message or is not a name. */
static Py_ssize_t skip_name(const unsigned char *d, Py_ssize_t size, Py_ssize_t at) {
    for (int labels = 0;; labels++) {
        if (at >= size || labels > 127) return -1;
        unsigned count = d[at];
        if (count == 0) return at + 1;
        if ((count & 0xC0) == 0xC0) return at + 2 <= size ? at + 2 : -1;
        if (count > 63) return -1;
        at += 1 + count;
    }
}

/*
 * An upstream answer as a cache template in `out` (its length returned; 0: not to be
 * cached), with the offsets of its TTL fields and the seconds it may be served.
 * Cached: NOERROR with answers (for the least TTL of its records), and NXDOMAIN or
 * NODATA with the zone's SOA in the authority section (for the lesser of the SOA's TTL
 * and its minimum, RFC 2308 section 5; the SOA's TTL is set to that). Not cached:
 * truncated answers, other RCODEs, a TTL of 0, more than CACHE_MAX_TTLS records, an
 * OPT record for a query without EDNS, or one that is not the last record. The OPT's
 * per-exchange options (COOKIE, TCP keepalive, padding) are left out; AA is cleared
 * (a cached answer is not authoritative).
 */
static size_t cache_template(const unsigned char *d, Py_ssize_t size, Py_ssize_t question_end,
                             unsigned form, unsigned char *out, uint16_t *ttl_at,
                             uint16_t *ttls, uint32_t *ttl) {
    if (size > CACHE_MAX_ANSWER || size < question_end || question_end < 12 + 5) return 0;
    if (d[2] & 0x02) return 0; /* TC */
    unsigned rcode = d[3] & 0x0F;
    if ((rcode != 0 && rcode != 3) || u16(d + 4) != 1) return 0;
    unsigned an = u16(d + 6), ns = u16(d + 8), ar = u16(d + 10);
    unsigned total = an + ns + ar;
    if (total > CACHE_MAX_TTLS) return 0;
    uint32_t least = UINT32_MAX, negative = UINT32_MAX;
    Py_ssize_t at = question_end, opt_rdata = -1, soa_ttl_at = -1;
    uint16_t n = 0;
    for (unsigned r = 0; r < total; r++) {
        at = skip_name(d, size, at);
        if (at < 0 || at + 10 > size) return 0;
        unsigned rtype = u16(d + at);
        uint32_t record_ttl = u32(d + at + 4);
        Py_ssize_t rdata = at + 10, end = rdata + u16(d + at + 8);
        if (end > size) return 0;
        if (rtype == TYPE_OPT) {
            if (r < an + ns || opt_rdata >= 0 || end != size || !(form & FORM_EDNS)) return 0;
            opt_rdata = rdata;
        } else {
            if (record_ttl == 0 || record_ttl > 0x7FFFFFFF) return 0; /* RFC 2181 8 */
            if (record_ttl < least) least = record_ttl;
            if (r >= an && r < an + ns && rtype == TYPE_SOA) {
                if (end - rdata < 22) return 0;
                uint32_t minimum = u32(d + end - 4);
                negative = record_ttl < minimum ? record_ttl : minimum;
                soa_ttl_at = at + 4;
            }
            ttl_at[n++] = (uint16_t)(at + 4);
        }
        at = end;
    }
    if (at != size) return 0;
    uint32_t keep;
    if (rcode == 3 || an == 0) {
        if (soa_ttl_at < 0 || negative == 0) return 0;
        keep = negative < CACHE_MAX_NEGATIVE_TTL ? negative : CACHE_MAX_NEGATIVE_TTL;
    } else {
        keep = CACHE_MAX_TTL;
    }
    if (least < keep) keep = least; /* so no record's TTL runs out while it is served */
    size_t length = (size_t)(opt_rdata >= 0 ? opt_rdata : size);
    memcpy(out, d, length);
    out[2] &= (unsigned char)~0x04; /* AA */
    for (uint16_t i = 0; i < n; i++) { /* every TTL at least `keep`, none above the cap */
        uint32_t v = u32(out + ttl_at[i]);
        if (ttl_at[i] == soa_ttl_at) v = keep;
        if (v > CACHE_MAX_TTL) v = CACHE_MAX_TTL;
        put_u32(out + ttl_at[i], v);
    }
    if (opt_rdata >= 0) {
        Py_ssize_t start = opt_rdata;
        while (start < size) {
            if (start + 4 > size) return 0;
            unsigned code = u16(d + start), option_length = u16(d + start + 2);
            if (start + 4 + (Py_ssize_t)option_length > size) return 0;
            if (code != 10 && code != 11 && code != 12) { /* COOKIE, keepalive, padding */
                memcpy(out + length, d + start, 4 + (size_t)option_length);
                length += 4 + option_length;
            }
            start += 4 + option_length;
        }
        size_t rdlength = length - (size_t)opt_rdata;
        out[opt_rdata - 2] = (unsigned char)(rdlength >> 8);
        out[opt_rdata - 1] = (unsigned char)rdlength;
    }
    *ttls = n;
    *ttl = keep;
    return length;
}

/* Write the cached answer `e` over the query in `d` (a PACKET-sized buffer): the
   query's id, RD and CD bits and question bytes (its letter case) kept, the TTLs aged
   by the whole seconds since it was stored. Returns the answer's length. */
static size_t serve_cached(unsigned char *d, Py_ssize_t question_end, const CacheEntry *e,
                           double now) {
    unsigned char head[4], question[MAX_NAME + 4 + 1];
    size_t qlength = (size_t)question_end - 12;
    memcpy(head, d, 4);
    memcpy(question, d + 12, qlength);
    memcpy(d, e->data + e->key_length, e->length);
    d[0] = head[0];
    d[1] = head[1];
    d[2] = (unsigned char)((d[2] & ~0x01) | (head[2] & 0x01));
    d[3] = (unsigned char)((d[3] & ~0x10) | (head[3] & 0x10));
    memcpy(d + 12, question, qlength);
    if (e->ttls) {
        uint32_t aged = now > e->stored ? (uint32_t)(now - e->stored) : 0;
        for (uint16_t i = 0; i < e->ttls; i++)
            put_u32(d + e->ttl_at[i], u32(d + e->ttl_at[i]) - aged);
    }
    return e->length;
}

/* ---- block counts: blocks answered from the cache, per (token, client address) */

typedef struct {
    PyObject *token; /* NULL: a free slot */
    unsigned char family, address[16];
    unsigned long long count;
} BlockCount;

typedef struct {
    BlockCount *slots; /* open addressing, twice the limit */
    uint32_t *used;    /* the slots taken, in order */
    size_t mask, limit, taken;
} BlockCounts;

static int counts_init(BlockCounts *b, size_t limit) {
    size_t n = 16;
    while (n < limit * 2) n <<= 1;
    b->slots = PyMem_RawCalloc(n, sizeof(BlockCount));
    b->used = PyMem_RawMalloc(limit * sizeof(uint32_t));
    if (b->slots == NULL || b->used == NULL) return -1;
    b->mask = n - 1;
    b->limit = limit;
    b->taken = 0;
    return 0;
}

/* Count one block of `token` for the client at `addr`; 0 when the table is full (the
   caller hands the query to Python instead, so no block goes uncounted). */
static int counts_add(BlockCounts *b, PyObject *token, const struct sockaddr_storage *addr) {
    unsigned char key[sizeof(PyObject *) + 17];
    memset(key, 0, sizeof key);
    memcpy(key, &token, sizeof(PyObject *));
    unsigned char *family = key + sizeof(PyObject *), *address = family + 1;
    if (addr->ss_family == AF_INET6) {
        *family = 6;
        memcpy(address, &((const struct sockaddr_in6 *)addr)->sin6_addr, 16);
    } else {
        *family = 4;
        memcpy(address, &((const struct sockaddr_in *)addr)->sin_addr, 4);
    }
    size_t i = (size_t)_Py_HashBytes(key, (Py_ssize_t)sizeof key) & b->mask;
    for (;; i = (i + 1) & b->mask) {
        BlockCount *s = &b->slots[i];
        if (s->token == NULL) {
            if (b->taken >= b->limit) return 0;
            Py_INCREF(token);
            s->token = token;
            s->family = *family;
            memcpy(s->address, address, 16);
            s->count = 1;
            b->used[b->taken++] = (uint32_t)i;
            return 1;
        }
        if (s->token == token && s->family == *family && memcmp(s->address, address, 16) == 0) {
            s->count++;
            return 1;
        }
    }
}

/* [(token, client, count)] for every count, and the table emptied; NULL on error (the
   counts are then kept). */
static PyObject *counts_take(BlockCounts *b) {
    PyObject *list = PyList_New((Py_ssize_t)b->taken);
    if (list == NULL) return NULL;
    for (size_t k = 0; k < b->taken; k++) {
        BlockCount *s = &b->slots[b->used[k]];
        char text[INET6_ADDRSTRLEN];
        inet_ntop(s->family == 6 ? AF_INET6 : AF_INET, s->address, text, sizeof text);
        PyObject *item = Py_BuildValue("(OsK)", s->token, text, s->count);
        if (item == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)k, item);
    }
    for (size_t k = 0; k < b->taken; k++) {
        BlockCount *s = &b->slots[b->used[k]];
        Py_CLEAR(s->token);
    }
    b->taken = 0;
    return list;
}

static void counts_free(BlockCounts *b) {
    if (b->slots != NULL)
        for (size_t k = 0; k < b->taken; k++) Py_CLEAR(b->slots[b->used[k]].token);
    PyMem_RawFree(b->slots);
    PyMem_RawFree(b->used);
    b->slots = NULL;
    b->used = NULL;
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
    uint8_t form;                /* the query's FORM_* bits, for the answer cache's key */
    unsigned long long generation; /* the caches' generation when it was sent */
    unsigned char query[];       /* as the client sent it (its id) */
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
    Cache answers, blocks;   /* see "answer caches" above */
    BlockCounts block_counts;
    PyObject *state;         /* the host cache the caches were filled under (a reference) */
    unsigned long long generation; /* bumped at every flush */
    unsigned long long blocks_answered, cache_hits, cache_misses, flushes, counts_full;
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
    static char *keywords[] = {"client_fd", "upstream_fd", "timeout", "max_in_flight",
                               "cache_size", "block_cache_size", "max_block_counts", NULL};
    r->max_in_flight = 30000;
    Py_ssize_t cache_size = 0, block_cache_size = 0, max_block_counts = 65536;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iid|nnnn", keywords, &r->client_fd,
                                     &r->upstream_fd, &r->timeout, &r->max_in_flight,
                                     &cache_size, &block_cache_size, &max_block_counts))
        return -1;
    if (r->max_in_flight < 1 || r->max_in_flight > 60000) {
        PyErr_SetString(PyExc_ValueError, "max_in_flight must be 1..60000");
        return -1;
    }
    if (cache_size < 0 || cache_size > (1 << 24) || block_cache_size < 0 ||
        block_cache_size > (1 << 24) || max_block_counts < 1 || max_block_counts > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "cache sizes must be 0..16777216, "
                                          "max_block_counts 1..16777216");
        return -1;
    }
    if (r->table != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a Relay is initialised once");
        return -1;
    }
    r->table = PyMem_RawCalloc(65536, sizeof(Entry *));
    if (r->table == NULL || batch_init(&r->in) < 0 ||
        cache_init(&r->answers, (size_t)cache_size) < 0 ||
        cache_init(&r->blocks, (size_t)block_cache_size) < 0 ||
        counts_init(&r->block_counts, (size_t)max_block_counts) < 0) {
        PyErr_NoMemory();
        return -1;
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
    cache_free(&r->answers);
    cache_free(&r->blocks);
    counts_free(&r->block_counts);
    Py_CLEAR(r->state);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

/* Empty both caches (the counts stay: their tokens say what they were blocked by). */
static void relay_flush_caches(Relay *r) {
    if (r->answers.buckets) cache_clear(&r->answers);
    if (r->blocks.buckets) cache_clear(&r->blocks);
    r->generation++;
    r->flushes++;
}

/* The caches hold what was decided under `state` (the engine's host cache); another
   object means the lists were swapped: empty them before anything is served. */
static void relay_see_state(Relay *r, PyObject *state) {
    if (state == r->state) return;
    if (r->state != NULL) relay_flush_caches(r);
    Py_INCREF(state);
    Py_XSETREF(r->state, state);
}

/*
 * from_clients(host_cache) -> [(query, address), ...]
 *
 * Reads what the listening socket has (up to ROUNDS x BATCH packets). A query with a
 * block answer cached for it gets that answer (counted for its client); one with an
 * upstream answer cached, that answer; a query whose name `host_cache` maps to None
 * is sent upstream under a fresh random id; every other packet is returned for the
 * full path. A `host_cache` other than the last one seen empties the caches first.
 */
static PyObject *relay_from_clients(Relay *r, PyObject *cache) {
    if (!PyDict_Check(cache)) {
        PyErr_SetString(PyExc_TypeError, "from_clients() takes the host cache (a dict)");
        return NULL;
    }
    relay_see_state(r, cache);
    PyObject *slow = PyList_New(0);
    if (slow == NULL) return NULL;
    Batch *in = &r->in;
    for (int round = 0; round < ROUNDS; round++) {
        batch_for_receiving(in);
        int n = recvmmsg(r->client_fd, in->msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) break; /* EAGAIN: drained; an error on a UDP listener: try later */
        double now = now_monotonic(), deadline = now + r->timeout;
        struct mmsghdr up[BATCH], back[BATCH];
        struct iovec up_iov[BATCH], back_iov[BATCH];
        uint16_t up_ids[BATCH];
        int ups = 0, backs = 0;
        for (int i = 0; i < n; i++) {
            unsigned char *data = in->iov[i].iov_base;
            Py_ssize_t size = in->msgs[i].msg_len;
            const struct sockaddr_storage *addr = &in->addrs[i];
            Question q;
            int fast = 0;
            if (size <= 0xFFFF && scan_question(data, size, &q)) {
                unsigned char key[KEY_MAX];
                size_t key_length = 0;
                Py_hash_t hash = 0;
                const CacheEntry *hit = NULL;
                if (r->blocks.buckets) {
                    key_length = answer_key(data, q.question_end,
                                            q.form & (FORM_EDNS | FORM_DO | FORM_EDE), key);
                    hash = _Py_HashBytes(key, (Py_ssize_t)key_length);
                    CacheEntry *e = cache_find(&r->blocks, key, key_length, hash);
                    if (e != NULL && e->length <= q.udp_size) {
                        if (counts_add(&r->block_counts, e->token, addr)) {
                            cache_touch(&r->blocks, e);
                            hit = e;
                            r->blocks_answered++;
                        } else {
                            r->counts_full++; /* Python counts it, one by one */
                        }
                    }
                }
                if (hit == NULL && r->answers.buckets && !(q.form & FORM_UNCACHED)) {
                    key_length = answer_key(data, q.question_end, q.form & ~FORM_EDE, key);
                    hash = _Py_HashBytes(key, (Py_ssize_t)key_length);
                    CacheEntry *e = cache_find(&r->answers, key, key_length, hash);
                    if (e != NULL && now - e->stored >= (double)e->ttl) {
                        cache_remove(&r->answers, e);
                        r->answers.expired++;
                        e = NULL;
                    }
                    if (e != NULL && e->length <= q.udp_size) {
                        cache_touch(&r->answers, e);
                        hit = e;
                        r->cache_hits++;
                    } else {
                        r->cache_misses++;
                    }
                }
                if (hit != NULL) {
                    back_iov[backs].iov_base = data;
                    back_iov[backs].iov_len = serve_cached(data, q.question_end, hit, now);
                    memset(&back[backs].msg_hdr, 0, sizeof(struct msghdr));
                    back[backs].msg_hdr.msg_iov = &back_iov[backs];
                    back[backs].msg_hdr.msg_iovlen = 1;
                    back[backs].msg_hdr.msg_name = &in->addrs[i];
                    back[backs].msg_hdr.msg_namelen = in->msgs[i].msg_hdr.msg_namelen;
                    backs++;
                    continue;
                }
                if (r->in_flight < r->max_in_flight) {
                    PyObject *name = PyUnicode_DecodeASCII(q.name, q.name_length, NULL);
                    if (name == NULL) goto error;
                    PyObject *match = PyDict_GetItemWithError(cache, name); /* borrowed */
                    Py_DECREF(name);
                    if (match == NULL && PyErr_Occurred()) goto error;
                    fast = match == Py_None;
                }
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
            e->form = (uint8_t)(q.form & ~FORM_EDE);
            e->generation = r->generation;
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
        while (sent < backs) { /* answered from a cache */
            int k = sendmmsg(r->client_fd, back + sent, (unsigned)(backs - sent), MSG_DONTWAIT);
            if (k <= 0) { /* the client's socket refused it: a lost UDP answer */
                r->send_failed++;
                sent++;
                continue;
            }
            sent += k;
        }
        sent = 0;
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

/* Store the answer relayed for `e` in the answer cache when it may be (see
   cache_template), unless the caches were flushed since `e` was sent. */
static void cache_answer(Relay *r, const Entry *e, const unsigned char *data,
                         Py_ssize_t size, double now) {
    if (r->answers.buckets == NULL || e->generation != r->generation ||
        (e->form & FORM_UNCACHED))
        return;
    unsigned char out[CACHE_MAX_ANSWER], key[KEY_MAX];
    uint16_t ttl_at[CACHE_MAX_TTLS], ttls = 0;
    uint32_t ttl = 0;
    size_t length = cache_template(data, size, e->question_end, e->form, out, ttl_at, &ttls,
                                   &ttl);
    if (length == 0) return;
    size_t key_length = answer_key(e->query, e->question_end, e->form, key);
    Py_hash_t hash = _Py_HashBytes(key, (Py_ssize_t)key_length);
    CacheEntry *c = cache_insert(&r->answers, key, key_length, hash, out, length, NULL);
    if (c == NULL) return; /* out of memory: not cached */
    c->stored = now;
    c->ttl = ttl;
    c->ttls = ttls;
    memcpy(c->ttl_at, ttl_at, ttls * sizeof(uint16_t));
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
        double now = now_monotonic();
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
                cache_answer(r, e, data, size, now);
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

/*
 * remember_block(query, answer, host_cache, token) -> bool
 *
 * Keep `answer`, the block answer Python built for `query` under the lists of
 * `host_cache`, to answer the same (name, qtype, form) from now on; `token` comes back
 * with each client's count (block_counts()). Refused (False): a query the relay would
 * not take, an answer that does not repeat its question or is too large to cache, no
 * block cache, or a `host_cache` that is no longer the one in force.
 */
static PyObject *relay_remember_block(Relay *r, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[1]) ||
        !PyDict_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "remember_block(query: bytes, answer: bytes, host_cache: dict, token)");
        return NULL;
    }
    const unsigned char *query = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    const unsigned char *answer = (const unsigned char *)PyBytes_AS_STRING(args[1]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]), length = PyBytes_GET_SIZE(args[1]);
    Question q;
    if (r->blocks.buckets == NULL || args[2] != r->state || size > 0xFFFF ||
        !scan_question(query, size, &q) || length > CACHE_MAX_ANSWER ||
        length < q.question_end ||
        memcmp(answer + 12, query + 12, (size_t)q.question_end - 12) != 0)
        Py_RETURN_FALSE;
    unsigned char key[KEY_MAX];
    size_t key_length = answer_key(query, q.question_end,
                                   q.form & (FORM_EDNS | FORM_DO | FORM_EDE), key);
    Py_hash_t hash = _Py_HashBytes(key, (Py_ssize_t)key_length);
    if (cache_insert(&r->blocks, key, key_length, hash, answer, (size_t)length, args[3]) == NULL)
        return PyErr_NoMemory();
    Py_RETURN_TRUE;
}

/* block_counts() -> [(token, client, count), ...]: the blocks answered from the cache
   since the last call, per token and client address; the counts start again at 0. */
static PyObject *relay_block_counts(Relay *r, PyObject *Py_UNUSED(ignored)) {
    return counts_take(&r->block_counts);
}

/* flush(): empty both caches now (the next host cache seen is taken as current). */
static PyObject *relay_flush(Relay *r, PyObject *Py_UNUSED(ignored)) {
    relay_flush_caches(r);
    Py_RETURN_NONE;
}

/* cache_stats(): entries held now (gauges), by cache and segment. */
static PyObject *relay_cache_stats(Relay *r, PyObject *Py_UNUSED(ignored)) {
    return Py_BuildValue("{snsnsnsnsnsn}", "cache_entries", (Py_ssize_t)cache_entries(&r->answers),
                         "cache_protected", (Py_ssize_t)r->answers.size[1], "cache_capacity",
                         (Py_ssize_t)r->answers.capacity, "block_entries",
                         (Py_ssize_t)cache_entries(&r->blocks), "block_capacity",
                         (Py_ssize_t)r->blocks.capacity, "block_counts_pending",
                         (Py_ssize_t)r->block_counts.taken);
}

/* given_back: queries handed back by expired() (past their deadline, after an ICMP
   error, or at shutdown); Python counts what it then does with them. */
static PyObject *relay_counts(Relay *r, PyObject *Py_UNUSED(ignored)) {
    return Py_BuildValue(
        "{sKsKsKsKsKsKsnsKsKsKsKsKsKsKsKsK}", "relayed", r->relayed, "handed_over",
        r->handed_over, "answered", r->answered, "upstream_mismatch", r->mismatched,
        "given_back", r->expired, "send_failed", r->send_failed, "in_flight", r->in_flight,
        "blocks_answered", r->blocks_answered, "block_counts_full", r->counts_full,
        "cache_hits", r->cache_hits, "cache_misses", r->cache_misses, "cache_inserted",
        r->answers.inserted, "cache_evicted", r->answers.evicted, "cache_expired",
        r->answers.expired, "cache_flushes", r->flushes, "block_cache_evicted",
        r->blocks.evicted);
}

static PyMethodDef relay_methods[] = {
    {"from_clients", (PyCFunction)relay_from_clients, METH_O,
     "Relay clean queries upstream; the other packets, with their address, for Python."},
    {"from_upstream", (PyCFunction)relay_from_upstream, METH_NOARGS,
     "Relay plain answers to their clients; ([(answer, query, address)], refused)."},
    {"expired", (PyCFunction)(void (*)(void))relay_expired, METH_VARARGS | METH_KEYWORDS,
     "Pending queries past their deadline (all of them with all=True), removed."},
    {"counts", (PyCFunction)relay_counts, METH_NOARGS, "Packet counters, and in flight."},
    {"remember_block", (PyCFunction)(void (*)(void))relay_remember_block, METH_FASTCALL,
     "Keep a block answer Python built, to answer the same question from the relay."},
    {"block_counts", (PyCFunction)relay_block_counts, METH_NOARGS,
     "[(token, client, count)] of blocks answered from the cache since the last call."},
    {"flush", (PyCFunction)relay_flush, METH_NOARGS, "Empty the block and answer caches."},
    {"cache_stats", (PyCFunction)relay_cache_stats, METH_NOARGS,
     "Entries held now, by cache (gauges)."},
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
