/*
 * tigertunnel.wire._hotpath: the per-frame data path, compiled.
 *
 * The same objects as the pure-Python modules (the reference), with the
 * same behaviour, byte for byte and error for error (the test suite runs
 * both); tigertunnel.wire.implementation picks one set or the other:
 *
 *   FrameParser   tigertunnel.wire.frames.FrameParser
 *   FrameSealer   tigertunnel.crypto.aead.FrameSealer
 *   FrameOpener   tigertunnel.crypto.aead.FrameOpener
 *   FrameEncoder  tigertunnel.wire.datapath.FrameEncoder (TB bytes in, wire bytes out)
 *   MuxReceiver   tigertunnel.wire.datapath.MuxReceiver  (wire bytes in, frames out)
 *
 * Memory: FrameParser, FrameEncoder and MuxReceiver hold Python objects
 * (a partial frame, an error message, an encoder's watch callback, which
 * is usually a method of the session that owns the encoder) and take part
 * in the cyclic GC (Py_TPFLAGS_HAVE_GC, tp_traverse, tp_clear); a sealer or
 * opener holds none, and is released only by dealloc, so that a cleared
 * encoder or receiver never becomes a plaintext one.
 *
 * Formats: docs/protocol.rst §6 (TB header, encrypted frame layout,
 * nonce and counters) and §§7.1-7.2 (mux header, frame kinds).
 *
 * AEGIS-128X2 is libaegis, the copy pyaegis installs:
 * tigertunnel.wire.implementation hands the addresses of
 * aegis128x2_encrypt_detached and aegis128x2_decrypt_detached (found and
 * checked by tigertunnel.crypto.libaegis) to bind_aegis() at import, and
 * this module calls them directly. Nothing here links against libaegis or
 * contains any of it.
 *
 * The wire constants below are exported as module attributes, with
 * BUILD_HASH (the SHA-256 of this file, from setup.py): the import compares
 * them with the Python modules and refuses a module that differs.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

/* Wire facts, source of truth: docs/protocol.rst §§1, 6 and 7. */
#define HEADER_SIZE 256
#define MIN_FRAME_SIZE 256
#define MAX_FRAME_SIZE (1u << 20)
#define SIZE_OFFSET 96
#define SIZE_END 100            /* bytes of a TB frame needed to read its size */
#define MUX_HEADER_SIZE 12
#define TAG_SIZE 16
#define KEY_SIZE 16
#define NONCE_SIZE 16
#define CLEAR_SIZE_OFFSET 16    /* in an encrypted frame */
#define CIPHERTEXT_OFFSET 20
#define CLOSE_PAYLOAD_SIZE 256
#define CONTROL_PAYLOAD_SIZE 256 /* docs/protocol.rst §12 */
#define TYPE_DATA 0
#define TYPE_OPEN 1
#define TYPE_CLOSE 2
#define REFERENCE_MAX_TYPE 2
#define MAX_TYPE 5               /* sealed stream_open 3, ping 4, pong 5 */

static const uint8_t MAGIC[4] = {'X', 'U', 'M', 'Z'};
static const uint8_t ZERO16[16] = {0};

typedef int (*aegis_encrypt_fn)(uint8_t *c, uint8_t *mac, size_t maclen,
                                const uint8_t *m, size_t mlen,
                                const uint8_t *ad, size_t adlen,
                                const uint8_t *npub, const uint8_t *k);
typedef int (*aegis_decrypt_fn)(uint8_t *m, const uint8_t *c, size_t clen,
                                const uint8_t *mac, size_t maclen,
                                const uint8_t *ad, size_t adlen,
                                const uint8_t *npub, const uint8_t *k);

static aegis_encrypt_fn aegis_encrypt = NULL;
static aegis_decrypt_fn aegis_decrypt = NULL;

/* tigertunnel.errors */
static PyObject *TunnelError, *FrameError, *ClusterMismatchError, *MuxError,
    *AuthenticationError;

/* ------------------------------------------------------------------ */
/* Small helpers                                                       */

static inline uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16
           | (uint32_t)p[3] << 24;
}

static inline void wr32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static inline int is_zero16(const uint8_t *p)
{
    return memcmp(p, ZERO16, 16) == 0;
}

static inline void write_mux_header(uint8_t *w, uint32_t stream_id, uint8_t type)
{
    memcpy(w, MAGIC, 4);
    wr32(w + 4, stream_id);
    w[8] = type;
    w[9] = w[10] = w[11] = 0;
}

/* An int from 16 little-endian bytes. */
static PyObject *u128_to_int(const uint8_t *p)
{
    return PyObject_CallMethod((PyObject *)&PyLong_Type, "from_bytes", "y#s",
                               (const char *)p, (Py_ssize_t)16, "little");
}

/* 16 little-endian bytes from an int in 0 .. 2**128-1; -1 with OverflowError
 * (out of range) or TypeError (not an int). */
static int int_to_u128(PyObject *value, uint8_t *out)
{
    if (!PyLong_Check(value)) {
        PyErr_Format(PyExc_TypeError, "expected an int, not %.100s",
                     Py_TYPE(value)->tp_name);
        return -1;
    }
    PyObject *b = PyObject_CallMethod(value, "to_bytes", "is", 16, "little");
    if (b == NULL)
        return -1;
    memcpy(out, PyBytes_AS_STRING(b), 16);
    Py_DECREF(b);
    return 0;
}

/* A u32 stream id, or -1 with the ValueError encode_header raises. */
static int parse_stream_id(PyObject *value, uint32_t *out)
{
    if (!PyLong_Check(value)) {
        PyErr_Format(PyExc_TypeError, "stream_id must be an int, not %.100s",
                     Py_TYPE(value)->tp_name);
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow || v < 0 || v > 0xFFFFFFFFLL) {
        PyErr_Format(PyExc_ValueError, "stream_id %S is not a u32", value);
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

/* ------------------------------------------------------------------ */
/* Keys and counter of one direction of a pool connection              */

typedef struct {
    uint8_t key[KEY_SIZE];
    uint8_t nonce[NONCE_SIZE];
    uint64_t counter;
    int spent; /* the counter reached 2**64: nothing more may be sealed/opened */
} DirKeys;

static int dirkeys_init(DirKeys *k, PyObject *key, PyObject *nonce, PyObject *counter)
{
    Py_buffer kb, nb;
    if (PyObject_GetBuffer(key, &kb, PyBUF_SIMPLE) < 0)
        return -1;
    if (kb.len != KEY_SIZE) {
        PyErr_Format(PyExc_ValueError, "key must be %d bytes, got %zd", KEY_SIZE, kb.len);
        PyBuffer_Release(&kb);
        return -1;
    }
    memcpy(k->key, kb.buf, KEY_SIZE);
    PyBuffer_Release(&kb);
    if (PyObject_GetBuffer(nonce, &nb, PyBUF_SIMPLE) < 0)
        return -1;
    if (nb.len != NONCE_SIZE) {
        PyErr_Format(PyExc_ValueError, "base nonce must be %d bytes, got %zd",
                     NONCE_SIZE, nb.len);
        PyBuffer_Release(&nb);
        return -1;
    }
    memcpy(k->nonce, nb.buf, NONCE_SIZE);
    PyBuffer_Release(&nb);
    k->spent = 0;
    k->counter = 0;
    if (counter == NULL)
        return 0;
    if (!PyLong_Check(counter)) {
        PyErr_Format(PyExc_TypeError, "counter must be an int, not %.100s",
                     Py_TYPE(counter)->tp_name);
        return -1;
    }
    unsigned long long c = PyLong_AsUnsignedLongLong(counter);
    if (c == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "counter %S is not a u64", counter);
        return -1;
    }
    k->counter = (uint64_t)c;
    return 0;
}

static inline void dirkeys_nonce(const DirKeys *k, uint8_t *out)
{
    memcpy(out, k->nonce, NONCE_SIZE);
    for (int i = 0; i < 8; i++)
        out[i] ^= (uint8_t)(k->counter >> (8 * i));
}

static inline void dirkeys_advance(DirKeys *k)
{
    if (k->counter == UINT64_MAX) {
        k->counter = 0;
        k->spent = 1;
    } else {
        k->counter++;
    }
}

static PyObject *dirkeys_get_counter(const DirKeys *k)
{
    if (!k->spent)
        return PyLong_FromUnsignedLongLong(k->counter);
    PyObject *max = PyLong_FromUnsignedLongLong(UINT64_MAX);
    if (max == NULL)
        return NULL;
    PyObject *one = PyLong_FromLong(1);
    PyObject *r = one ? PyNumber_Add(max, one) : NULL;
    Py_DECREF(max);
    Py_XDECREF(one);
    return r;
}

static int dirkeys_set_counter(DirKeys *k, PyObject *value)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "the counter cannot be deleted");
        return -1;
    }
    if (!PyLong_Check(value)) {
        PyErr_Format(PyExc_TypeError, "counter must be an int, not %.100s",
                     Py_TYPE(value)->tp_name);
        return -1;
    }
    unsigned long long c = PyLong_AsUnsignedLongLong(value);
    if (c == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        /* 2**64 itself: exhausted */
        PyObject *max = PyLong_FromUnsignedLongLong(UINT64_MAX);
        PyObject *one = PyLong_FromLong(1);
        PyObject *limit = (max && one) ? PyNumber_Add(max, one) : NULL;
        Py_XDECREF(max);
        Py_XDECREF(one);
        if (limit == NULL)
            return -1;
        int eq = PyObject_RichCompareBool(value, limit, Py_EQ);
        Py_DECREF(limit);
        if (eq < 0)
            return -1;
        if (!eq) {
            PyErr_Format(PyExc_ValueError, "counter %S is not in 0..2**64", value);
            return -1;
        }
        k->counter = 0;
        k->spent = 1;
        return 0;
    }
    k->counter = (uint64_t)c;
    k->spent = 0;
    return 0;
}

/* The encrypted frame layout of docs/protocol.rst §6.2, in place.
 *
 * w points at a mux header (12 bytes, already written: it is the AD)
 * followed by room for a frame of `size` bytes whose body B is already at
 * w + 12 + 256. hdr is the frame's 256-byte TB header; it must not overlap
 * w + 12 .. w + 12 + 256. */
static int seal_at(DirKeys *k, uint8_t *w, const uint8_t *hdr, size_t size)
{
    uint8_t *f = w + MUX_HEADER_SIZE;
    uint8_t nonce[NONCE_SIZE];
    memcpy(f + CLEAR_SIZE_OFFSET, hdr + SIZE_OFFSET, 4);
    memcpy(f + 20, hdr, 64);
    memcpy(f + 84, hdr + 100, 156);
    memcpy(f + 240, hdr + 240, 16);
    dirkeys_nonce(k, nonce);
    if (aegis_encrypt(f + CIPHERTEXT_OFFSET, f, TAG_SIZE, f + CIPHERTEXT_OFFSET,
                      size - CIPHERTEXT_OFFSET, w, MUX_HEADER_SIZE, nonce, k->key) != 0) {
        PyErr_SetString(FrameError, "frame encryption failed: Encryption failed");
        return -1;
    }
    dirkeys_advance(k);
    return 0;
}

/* Authenticate and decrypt one encrypted frame (docs/protocol.rst §6.5).
 *
 * src holds the encrypted frame (tag, clear size, ciphertext), `size`
 * bytes; dst receives the rebuilt TB frame and may be src itself. The
 * caller has checked the size range and the clear size field. A failed
 * tag leaves the counter unchanged and dst[20:] zeroed. */
static int open_into(DirKeys *k, const uint8_t *cluster, uint8_t *dst,
                     const uint8_t *src, size_t size, const uint8_t *ad)
{
    uint8_t nonce[NONCE_SIZE], tag[TAG_SIZE], head[64];
    if (k->spent) {
        PyErr_SetString(AuthenticationError,
                        "frame counter exhausted: the pool connection needs new keys");
        return -1;
    }
    memcpy(tag, src, TAG_SIZE);
    dirkeys_nonce(k, nonce);
    if (aegis_decrypt(dst + CIPHERTEXT_OFFSET, src + CIPHERTEXT_OFFSET,
                      size - CIPHERTEXT_OFFSET, tag, TAG_SIZE, ad, MUX_HEADER_SIZE,
                      nonce, k->key) != 0) {
        memset(dst + CIPHERTEXT_OFFSET, 0, size - CIPHERTEXT_OFFSET);
        PyErr_Format(AuthenticationError, "frame with counter %llu failed to authenticate",
                     (unsigned long long)k->counter);
        return -1;
    }
    dirkeys_advance(k);
    /* P[0:64] at dst[20:84], P[64:220] at dst[84:240]. */
    memcpy(head, dst + CIPHERTEXT_OFFSET, 64);
    if (!is_zero16(head + 16) || !is_zero16(head + 48)) {
        PyErr_SetString(FrameError, "InvalidPadding: a decrypted padding field is not zero");
        return -1;
    }
    memmove(dst + 100, dst + 84, 156);
    memcpy(dst, head, 16);
    memset(dst + 16, 0, 16);
    memcpy(dst + 32, head + 32, 16);
    memset(dst + 48, 0, 32);
    memcpy(dst + 80, cluster, 16);
    wr32(dst + SIZE_OFFSET, (uint32_t)size);
    return 0;
}

/* The checks FrameOpener.open_buffer makes before decrypting. */
static int check_encrypted(const uint8_t *p, Py_ssize_t size)
{
    if (size < MIN_FRAME_SIZE || size > (Py_ssize_t)MAX_FRAME_SIZE) {
        PyErr_Format(FrameError, "encrypted frame of %zd bytes outside %d..%u", size,
                     MIN_FRAME_SIZE, MAX_FRAME_SIZE);
        return -1;
    }
    uint32_t clear = rd32(p + CLEAR_SIZE_OFFSET);
    if ((Py_ssize_t)clear != size) {
        PyErr_Format(FrameError, "encrypted frame of %zd bytes has size field %u", size,
                     clear);
        return -1;
    }
    return 0;
}

static int need_aegis(void)
{
    if (aegis_encrypt == NULL || aegis_decrypt == NULL) {
        PyErr_SetString(PyExc_RuntimeError,
                        "libaegis is not bound (tigertunnel.crypto.aead binds it)");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* FrameSealer                                                         */

typedef struct {
    PyObject_HEAD
    DirKeys keys;
} SealerObject;

static PyTypeObject SealerType;

static int Sealer_init(SealerObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"key", "base_nonce", "counter", NULL};
    PyObject *key, *nonce, *counter = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|O:FrameSealer", kwlist, &key,
                                     &nonce, &counter))
        return -1;
    if (need_aegis() < 0)
        return -1;
    return dirkeys_init(&self->keys, key, nonce, counter);
}

/* The checks FrameSealer.seal_buffer makes, in its order. */
static int check_seal(DirKeys *k, const uint8_t *frame, Py_ssize_t size,
                      Py_ssize_t header_len)
{
    if (size < MIN_FRAME_SIZE || size > (Py_ssize_t)MAX_FRAME_SIZE) {
        PyErr_Format(FrameError, "TB frame of %zd bytes outside %d..%u", size,
                     MIN_FRAME_SIZE, MAX_FRAME_SIZE);
        return -1;
    }
    uint32_t field = rd32(frame + SIZE_OFFSET);
    if ((Py_ssize_t)field != size) {
        PyErr_Format(FrameError, "TB frame of %zd bytes has size field %u", size, field);
        return -1;
    }
    if (!is_zero16(frame + 16) || !is_zero16(frame + 48)) {
        PyErr_SetString(FrameError, "InvalidPadding: a checksum padding field is not zero");
        return -1;
    }
    if (header_len != MUX_HEADER_SIZE) {
        PyErr_SetString(FrameError, "associated data must be the 12-byte mux header");
        return -1;
    }
    if (k->spent) {
        PyErr_SetString(TunnelError,
                        "frame counter exhausted: the pool connection needs new keys");
        return -1;
    }
    return 0;
}

static PyObject *seal_common(SealerObject *self, PyObject *const *args, Py_ssize_t nargs,
                             int as_bytes)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "expected (mux_header, frame)");
        return NULL;
    }
    Py_buffer hb, fb;
    if (PyObject_GetBuffer(args[0], &hb, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &fb, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&hb);
        return NULL;
    }
    PyObject *out = NULL;
    const uint8_t *frame = fb.buf;
    Py_ssize_t size = fb.len;
    if (check_seal(&self->keys, frame, size, hb.len) < 0)
        goto done;
    out = as_bytes ? PyBytes_FromStringAndSize(NULL, MUX_HEADER_SIZE + size)
                   : PyByteArray_FromStringAndSize(NULL, MUX_HEADER_SIZE + size);
    if (out == NULL)
        goto done;
    uint8_t *w = (uint8_t *)(as_bytes ? PyBytes_AS_STRING(out) : PyByteArray_AS_STRING(out));
    memcpy(w, hb.buf, MUX_HEADER_SIZE);
    memcpy(w + MUX_HEADER_SIZE + HEADER_SIZE, frame + HEADER_SIZE, size - HEADER_SIZE);
    if (seal_at(&self->keys, w, frame, (size_t)size) < 0)
        Py_CLEAR(out);
done:
    PyBuffer_Release(&hb);
    PyBuffer_Release(&fb);
    return out;
}

static PyObject *Sealer_seal_buffer(SealerObject *self, PyObject *const *args,
                                    Py_ssize_t nargs)
{
    return seal_common(self, args, nargs, 0);
}

static PyObject *Sealer_seal(SealerObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *b = seal_common(self, args, nargs, 1);
    if (b == NULL)
        return NULL;
    PyObject *list = PyList_New(1);
    if (list == NULL) {
        Py_DECREF(b);
        return NULL;
    }
    PyList_SET_ITEM(list, 0, b);
    return list;
}

static PyObject *Sealer_get_counter(SealerObject *self, void *closure)
{
    return dirkeys_get_counter(&self->keys);
}

static int Sealer_set_counter(SealerObject *self, PyObject *value, void *closure)
{
    return dirkeys_set_counter(&self->keys, value);
}

static PyMethodDef Sealer_methods[] = {
    {"seal_buffer", (PyCFunction)(void (*)(void))Sealer_seal_buffer, METH_FASTCALL,
     "seal_buffer(mux_header, frame) -> bytearray: mux header + encrypted frame."},
    {"seal", (PyCFunction)(void (*)(void))Sealer_seal, METH_FASTCALL,
     "seal(mux_header, frame) -> [bytes]: like seal_buffer, for writeSequence."},
    {NULL}};

static PyGetSetDef Sealer_getset[] = {
    {"counter", (getter)Sealer_get_counter, (setter)Sealer_set_counter,
     "The counter value the next sealed frame uses.", NULL},
    {NULL}};

static PyTypeObject SealerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tigertunnel.wire._hotpath.FrameSealer",
    .tp_basicsize = sizeof(SealerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Encrypt the TB frames one end sends on a pool connection (compiled).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Sealer_init,
    .tp_methods = Sealer_methods,
    .tp_getset = Sealer_getset,
};

/* ------------------------------------------------------------------ */
/* FrameOpener                                                         */

typedef struct {
    PyObject_HEAD
    DirKeys keys;
    uint8_t cluster[16];
} OpenerObject;

static PyTypeObject OpenerType;

static int Opener_init(OpenerObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"key", "base_nonce", "cluster_id", "counter", NULL};
    PyObject *key, *nonce, *cluster = NULL, *counter = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|OO:FrameOpener", kwlist, &key,
                                     &nonce, &cluster, &counter))
        return -1;
    if (need_aegis() < 0)
        return -1;
    memset(self->cluster, 0, 16);
    if (cluster != NULL && int_to_u128(cluster, self->cluster) < 0) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "cluster id %S is not a u128", cluster);
        }
        return -1;
    }
    return dirkeys_init(&self->keys, key, nonce, counter);
}

/* open_buffer: decrypt `payload` after the checks, in the pure order. A
 * bytearray payload is decrypted in place. */
static PyObject *Opener_open_buffer(OpenerObject *self, PyObject *const *args,
                                    Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "expected (mux_header, payload)");
        return NULL;
    }
    Py_buffer hb, pb;
    if (PyObject_GetBuffer(args[1], &pb, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *out = NULL;
    if (check_encrypted(pb.buf, pb.len) < 0) {
        PyBuffer_Release(&pb);
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &hb, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&pb);
        return NULL;
    }
    if (hb.len != MUX_HEADER_SIZE) {
        PyErr_SetString(FrameError, "associated data must be the 12-byte mux header");
        goto done;
    }
    uint8_t ad[MUX_HEADER_SIZE];
    memcpy(ad, hb.buf, MUX_HEADER_SIZE);
    if (PyByteArray_CheckExact(args[1])) {
        out = args[1];
        Py_INCREF(out);
        uint8_t *p = (uint8_t *)PyByteArray_AS_STRING(out);
        if (open_into(&self->keys, self->cluster, p, p, (size_t)pb.len, ad) < 0)
            Py_CLEAR(out);
        goto done;
    }
    out = PyByteArray_FromStringAndSize(NULL, pb.len);
    if (out == NULL)
        goto done;
    uint8_t *d = (uint8_t *)PyByteArray_AS_STRING(out);
    memcpy(d, pb.buf, CIPHERTEXT_OFFSET);
    if (open_into(&self->keys, self->cluster, d, pb.buf, (size_t)pb.len, ad) < 0)
        Py_CLEAR(out);
done:
    PyBuffer_Release(&hb);
    PyBuffer_Release(&pb);
    return out;
}

static PyObject *Opener_get_counter(OpenerObject *self, void *closure)
{
    return dirkeys_get_counter(&self->keys);
}

static int Opener_set_counter(OpenerObject *self, PyObject *value, void *closure)
{
    return dirkeys_set_counter(&self->keys, value);
}

static PyMethodDef Opener_methods[] = {
    {"open_buffer", (PyCFunction)(void (*)(void))Opener_open_buffer, METH_FASTCALL,
     "open_buffer(mux_header, payload) -> bytearray: the rebuilt TB frame "
     "(a bytearray payload is decrypted in place and returned)."},
    {NULL}};

static PyGetSetDef Opener_getset[] = {
    {"counter", (getter)Opener_get_counter, (setter)Opener_set_counter,
     "The counter value the next frame must have been sealed with.", NULL},
    {NULL}};

static PyTypeObject OpenerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tigertunnel.wire._hotpath.FrameOpener",
    .tp_basicsize = sizeof(OpenerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Authenticate and decrypt the TB frames one end receives (compiled).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Opener_init,
    .tp_methods = Opener_methods,
    .tp_getset = Opener_getset,
};

/* ------------------------------------------------------------------ */
/* A frame held across reads: a bytes object that grows with what has   */
/* arrived (never more than twice that), so a peer that announces a     */
/* large frame and sends little costs little.                           */

typedef struct {
    PyObject *obj;      /* bytes: `room` bytes, then the frame so far */
    Py_ssize_t room;    /* bytes kept before the frame (a mux header) */
    Py_ssize_t size;    /* the frame's full length */
    Py_ssize_t have;    /* bytes of it stored */
} Pending;

static void pending_clear(Pending *p)
{
    Py_CLEAR(p->obj);
    p->size = p->have = 0;
}

/* Start a frame of `size` bytes with the `n` bytes at src. */
static int pending_start(Pending *p, Py_ssize_t size, const uint8_t *src, Py_ssize_t n)
{
    Py_ssize_t cap = n * 2 > 4096 ? n * 2 : 4096;
    if (cap > size)
        cap = size;
    p->obj = PyBytes_FromStringAndSize(NULL, p->room + cap);
    if (p->obj == NULL)
        return -1;
    p->size = size;
    p->have = n;
    memcpy(PyBytes_AS_STRING(p->obj) + p->room, src, n);
    return 0;
}

/* Add up to what the frame still needs from src; returns the bytes taken. */
static Py_ssize_t pending_add(Pending *p, const uint8_t *src, Py_ssize_t n)
{
    Py_ssize_t take = p->size - p->have;
    if (take > n)
        take = n;
    Py_ssize_t cap = PyBytes_GET_SIZE(p->obj) - p->room;
    if (p->have + take > cap) {
        Py_ssize_t grow = cap * 2;
        if (grow < p->have + take)
            grow = p->have + take;
        if (grow > p->size)
            grow = p->size;
        if (_PyBytes_Resize(&p->obj, p->room + grow) < 0) {
            p->obj = NULL;
            p->size = p->have = 0;
            return -1;
        }
    }
    memcpy(PyBytes_AS_STRING(p->obj) + p->room + p->have, src, take);
    p->have += take;
    return take;
}

/* ------------------------------------------------------------------ */
/* TB frame scanning (docs/protocol.rst §6.1): shared by FrameParser  */
/* and FrameEncoder.                                                  */

typedef struct {
    const uint8_t *ptr; /* the frame, in the caller's input ... */
    PyObject *obj;      /* ... or whole in this bytes object, after `room` bytes */
    Py_ssize_t size;
} TBRef;

typedef struct {
    TBRef *v;
    Py_ssize_t n, cap;
    TBRef small[16];
} TBRefs;

static void tbrefs_init(TBRefs *r)
{
    r->v = r->small;
    r->n = 0;
    r->cap = 16;
}

static void tbrefs_release(TBRefs *r)
{
    for (Py_ssize_t i = 0; i < r->n; i++)
        Py_XDECREF(r->v[i].obj);
    if (r->v != r->small)
        PyMem_Free(r->v);
    r->v = r->small;
    r->n = 0;
}

static int tbrefs_push(TBRefs *r, const uint8_t *ptr, PyObject *obj, Py_ssize_t size)
{
    if (r->n == r->cap) {
        Py_ssize_t cap = r->cap * 2;
        TBRef *v = PyMem_Malloc(cap * sizeof(TBRef));
        if (v == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(v, r->v, r->n * sizeof(TBRef));
        if (r->v != r->small)
            PyMem_Free(r->v);
        r->v = v;
        r->cap = cap;
    }
    r->v[r->n].ptr = ptr;
    r->v[r->n].obj = obj;
    r->v[r->n].size = size;
    r->n++;
    return 0;
}

typedef struct {
    uint8_t stage[SIZE_END]; /* the start of a frame whose size is not readable yet */
    Py_ssize_t stage_len;
    Pending pend;            /* a frame of known size, incomplete */
    uint32_t max_size;
    PyObject *error;         /* str: the first failure; the scanner is dead */
} TBScan;

static int tb_check_size(TBScan *s, uint32_t size)
{
    if (size < MIN_FRAME_SIZE || size > s->max_size) {
        PyErr_Format(FrameError, "TB frame size %u outside %d..%u", size, MIN_FRAME_SIZE,
                     s->max_size);
        return -1;
    }
    return 0;
}

static void tbscan_reset(TBScan *s)
{
    s->stage_len = 0;
    pending_clear(&s->pend);
}

static Py_ssize_t tbscan_buffered(TBScan *s)
{
    return s->pend.obj ? s->pend.have : s->stage_len;
}

/* Cut d[0:len] into frames, appended to out; keep the incomplete rest.
 * A bad size raises FrameError as soon as its four bytes are readable. */
static int tbscan_feed(TBScan *s, const uint8_t *d, Py_ssize_t len, TBRefs *out)
{
    Py_ssize_t pos = 0;
    if (s->pend.obj != NULL) {
        Py_ssize_t took = pending_add(&s->pend, d, len);
        if (took < 0)
            return -1;
        pos = took;
        if (s->pend.have < s->pend.size)
            return 0;
        if (tbrefs_push(out, NULL, s->pend.obj, s->pend.size) < 0)
            return -1;
        s->pend.obj = NULL;
        s->pend.size = s->pend.have = 0;
    } else if (s->stage_len > 0) {
        Py_ssize_t take = SIZE_END - s->stage_len;
        if (take > len)
            take = len;
        memcpy(s->stage + s->stage_len, d, take);
        s->stage_len += take;
        pos = take;
        if (s->stage_len < SIZE_END)
            return 0;
        uint32_t size = rd32(s->stage + SIZE_OFFSET);
        if (tb_check_size(s, size) < 0)
            return -1;
        s->stage_len = 0;
        if (pending_start(&s->pend, size, s->stage, SIZE_END) < 0)
            return -1;
        Py_ssize_t took = pending_add(&s->pend, d + pos, len - pos);
        if (took < 0)
            return -1;
        pos += took;
        if (s->pend.have < s->pend.size)
            return 0;
        if (tbrefs_push(out, NULL, s->pend.obj, s->pend.size) < 0)
            return -1;
        s->pend.obj = NULL;
        s->pend.size = s->pend.have = 0;
    }
    while (len - pos >= SIZE_END) {
        uint32_t size = rd32(d + pos + SIZE_OFFSET);
        if (tb_check_size(s, size) < 0)
            return -1;
        if (len - pos < (Py_ssize_t)size)
            break;
        if (tbrefs_push(out, d + pos, NULL, size) < 0)
            return -1;
        pos += size;
    }
    Py_ssize_t left = len - pos;
    if (left >= SIZE_END) {
        if (pending_start(&s->pend, rd32(d + pos + SIZE_OFFSET), d + pos, left) < 0)
            return -1;
    } else if (left > 0) {
        memcpy(s->stage, d + pos, left);
        s->stage_len = left;
    }
    return 0;
}

/* Record the pending exception's message as the scanner's error. */
static void remember_error(PyObject **slot)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (*slot == NULL && value != NULL)
        *slot = PyObject_Str(value);
    if (*slot == NULL)
        PyErr_Clear();
    PyErr_Restore(type, value, tb);
}

/* ------------------------------------------------------------------ */
/* FrameParser                                                         */

typedef struct {
    PyObject_HEAD
    TBScan scan;
} ParserObject;

static int Parser_init(ParserObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"max_size", NULL};
    PyObject *max = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:FrameParser", kwlist, &max))
        return -1;
    long long m = MAX_FRAME_SIZE;
    if (max != NULL) {
        if (!PyLong_Check(max)) {
            PyErr_Format(PyExc_TypeError, "max_size must be an int, not %.100s",
                         Py_TYPE(max)->tp_name);
            return -1;
        }
        int overflow = 0;
        m = PyLong_AsLongLongAndOverflow(max, &overflow);
        if (m == -1 && PyErr_Occurred())
            return -1;
        if (overflow)
            m = -1;
    }
    if (m < MIN_FRAME_SIZE || m > MAX_FRAME_SIZE) {
        PyErr_Format(PyExc_ValueError, "max_size must be in %d..%u", MIN_FRAME_SIZE,
                     MAX_FRAME_SIZE);
        return -1;
    }
    tbscan_reset(&self->scan);
    Py_CLEAR(self->scan.error);
    self->scan.pend.room = 0;
    self->scan.max_size = (uint32_t)m;
    return 0;
}

static int Parser_traverse(ParserObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->scan.pend.obj);
    Py_VISIT(self->scan.error);
    return 0;
}

static int Parser_clear(ParserObject *self)
{
    tbscan_reset(&self->scan);
    Py_CLEAR(self->scan.error);
    return 0;
}

static void Parser_dealloc(ParserObject *self)
{
    PyObject_GC_UnTrack(self);
    Parser_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Parser_feed(ParserObject *self, PyObject *data)
{
    TBScan *s = &self->scan;
    if (s->error != NULL) {
        PyErr_Format(FrameError, "frame parser already failed: %U", s->error);
        return NULL;
    }
    Py_buffer b;
    if (PyObject_GetBuffer(data, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    TBRefs refs;
    tbrefs_init(&refs);
    PyObject *list = NULL;
    if (tbscan_feed(s, b.buf, b.len, &refs) < 0) {
        remember_error(&s->error);
        tbscan_reset(s);
        goto done;
    }
    list = PyList_New(refs.n);
    if (list == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < refs.n; i++) {
        TBRef *r = &refs.v[i];
        PyObject *f;
        if (r->obj != NULL) {
            f = r->obj;
            r->obj = NULL;
        } else {
            f = PyBytes_FromStringAndSize((const char *)r->ptr, r->size);
            if (f == NULL) {
                Py_CLEAR(list);
                goto done;
            }
        }
        PyList_SET_ITEM(list, i, f);
    }
done:
    tbrefs_release(&refs);
    PyBuffer_Release(&b);
    return list;
}

static PyObject *Parser_buffered(ParserObject *self, PyObject *unused)
{
    return PyLong_FromSsize_t(tbscan_buffered(&self->scan));
}

static PyMethodDef Parser_methods[] = {
    {"feed", (PyCFunction)Parser_feed, METH_O,
     "feed(data) -> [bytes]: every TB frame `data` completed, in order."},
    {"buffered", (PyCFunction)Parser_buffered, METH_NOARGS,
     "buffered() -> int: bytes of an incomplete frame held."},
    {NULL}};

static PyTypeObject ParserType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tigertunnel.wire._hotpath.FrameParser",
    .tp_basicsize = sizeof(ParserObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)Parser_traverse,
    .tp_clear = (inquiry)Parser_clear,
    .tp_free = PyObject_GC_Del,
    .tp_doc = "Cut a byte stream into complete TB frames (compiled).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Parser_init,
    .tp_dealloc = (destructor)Parser_dealloc,
    .tp_methods = Parser_methods,
};

/* ------------------------------------------------------------------ */
/* FrameEncoder: TB bytes from one session's peer -> pool-connection    */
/* wire bytes, in one call per read.                                   */

typedef struct {
    PyObject_HEAD
    TBScan scan;
    SealerObject *sealer; /* NULL: plaintext mode */
    uint32_t stream_id;
    int check;            /* apply check_frame (padding, nonce_reserved, cluster) */
    uint8_t cluster[16];  /* the cluster a checked frame must carry */
    PyObject *watch;      /* called with each frame's header before it is sealed, or NULL */
    Py_ssize_t last_frames; /* TB frames the last encode() call completed */
} EncoderObject;

static int Encoder_init(EncoderObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"stream_id", "sealer", "check", "cluster_id", "watch", NULL};
    PyObject *sid, *sealer, *cluster = Py_None, *watch = Py_None;
    int check;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOp|OO:FrameEncoder", kwlist, &sid,
                                     &sealer, &check, &cluster, &watch))
        return -1;
    if (watch != Py_None && !PyCallable_Check(watch)) {
        PyErr_Format(PyExc_TypeError, "watch must be callable or None, not %.100s",
                     Py_TYPE(watch)->tp_name);
        return -1;
    }
    if (parse_stream_id(sid, &self->stream_id) < 0)
        return -1;
    memset(self->cluster, 0, 16);
    if (cluster != Py_None && int_to_u128(cluster, self->cluster) < 0) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "cluster id %S is not a u128", cluster);
        }
        return -1;
    }
    if (sealer != Py_None && !PyObject_TypeCheck(sealer, &SealerType)) {
        PyErr_Format(PyExc_TypeError,
                     "sealer must be a compiled FrameSealer or None, not %.100s",
                     Py_TYPE(sealer)->tp_name);
        return -1;
    }
    Py_CLEAR(self->sealer);
    if (sealer != Py_None) {
        Py_INCREF(sealer);
        self->sealer = (SealerObject *)sealer;
    }
    self->check = check;
    Py_CLEAR(self->watch);
    if (watch != Py_None) {
        Py_INCREF(watch);
        self->watch = watch;
    }
    self->last_frames = 0;
    tbscan_reset(&self->scan);
    Py_CLEAR(self->scan.error);
    self->scan.pend.room = MUX_HEADER_SIZE;
    self->scan.max_size = MAX_FRAME_SIZE;
    return 0;
}

/* The watch is usually a bound method of the session that owns the
 * encoder (session -> encoder -> watch -> session): only the cyclic GC can
 * free that cycle, so it must see through the encoder. */
static int Encoder_traverse(EncoderObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->watch);
    Py_VISIT(self->sealer);
    Py_VISIT(self->scan.pend.obj);
    Py_VISIT(self->scan.error);
    return 0;
}

/* Breaks a cycle through the watch. The sealer holds no Python object, so
 * it cannot be part of a cycle: it stays until dealloc, and an encoder is
 * never left without its sealer (which would make it a plaintext one). */
static int Encoder_clear(EncoderObject *self)
{
    tbscan_reset(&self->scan);
    Py_CLEAR(self->scan.error);
    Py_CLEAR(self->watch);
    return 0;
}

static void Encoder_dealloc(EncoderObject *self)
{
    PyObject_GC_UnTrack(self);
    Encoder_clear(self);
    Py_CLEAR(self->sealer);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* check_frame (frames.py), or the sealer's own padding rule. */
static int encoder_check(EncoderObject *self, const uint8_t *f)
{
    if (self->check) {
        if (!is_zero16(f + 16)) {
            PyErr_SetString(FrameError, "InvalidPadding: checksum_padding is not zero");
            return -1;
        }
        if (!is_zero16(f + 48)) {
            PyErr_SetString(FrameError, "InvalidPadding: checksum_body_padding is not zero");
            return -1;
        }
        if (!is_zero16(f + 64)) {
            PyErr_SetString(FrameError,
                            "nonce_reserved is not zero (the tunnel cannot carry it)");
            return -1;
        }
        if (memcmp(f + 80, self->cluster, 16) != 0) {
            PyObject *expected = u128_to_int(self->cluster);
            PyObject *got = expected ? u128_to_int(f + 80) : NULL;
            if (got != NULL) {
                PyObject *e = PyObject_CallFunctionObjArgs(ClusterMismatchError, expected,
                                                           got, NULL);
                if (e != NULL) {
                    PyErr_SetObject(ClusterMismatchError, e);
                    Py_DECREF(e);
                }
            }
            Py_XDECREF(expected);
            Py_XDECREF(got);
            return -1;
        }
    } else if (self->sealer != NULL && (!is_zero16(f + 16) || !is_zero16(f + 48))) {
        PyErr_SetString(FrameError, "InvalidPadding: a checksum padding field is not zero");
        return -1;
    }
    return 0;
}

static PyObject *Encoder_encode(EncoderObject *self, PyObject *data)
{
    TBScan *s = &self->scan;
    if (s->error != NULL) {
        PyErr_Format(FrameError, "frame encoder already failed: %U", s->error);
        return NULL;
    }
    Py_buffer b;
    if (PyObject_GetBuffer(data, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    TBRefs refs;
    tbrefs_init(&refs);
    PyObject *out = NULL;
    self->last_frames = 0;
    if (tbscan_feed(s, b.buf, b.len, &refs) < 0)
        goto fail;
    Py_ssize_t n = refs.n;
    if (n == 0) {
        out = PyBytes_FromStringAndSize(NULL, 0);
        goto done;
    }
    /* Every frame is checked before any is sealed: a bad frame costs no
     * counter value and nothing of this read is sent. */
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        TBRef *r = &refs.v[i];
        const uint8_t *f = r->obj ? (const uint8_t *)PyBytes_AS_STRING(r->obj)
                                        + MUX_HEADER_SIZE
                                  : r->ptr;
        if (encoder_check(self, f) < 0)
            goto fail;
        total += MUX_HEADER_SIZE + r->size;
    }
    DirKeys *k = self->sealer ? &self->sealer->keys : NULL;
    if (k != NULL && (k->spent || (uint64_t)n - 1 > UINT64_MAX - k->counter)) {
        PyErr_SetString(TunnelError,
                        "frame counter exhausted: the pool connection needs new keys");
        goto fail;
    }
    if (self->watch != NULL) {
        /* Checked frames only, in order, before anything is sealed. */
        for (Py_ssize_t i = 0; i < n; i++) {
            TBRef *r = &refs.v[i];
            const uint8_t *f = r->obj ? (const uint8_t *)PyBytes_AS_STRING(r->obj)
                                            + MUX_HEADER_SIZE
                                      : r->ptr;
            PyObject *header = PyBytes_FromStringAndSize((const char *)f, HEADER_SIZE);
            if (header == NULL)
                goto fail;
            PyObject *res = PyObject_CallOneArg(self->watch, header);
            Py_DECREF(header);
            if (res == NULL)
                goto fail;
            Py_DECREF(res);
        }
    }
    self->last_frames = n;
    if (n == 1 && refs.v[0].obj != NULL) {
        /* One frame held across reads: it already sits after room for
         * its mux header. */
        out = refs.v[0].obj;
        refs.v[0].obj = NULL;
        uint8_t *w = (uint8_t *)PyBytes_AS_STRING(out);
        write_mux_header(w, self->stream_id, TYPE_DATA);
        if (k != NULL) {
            uint8_t hdr[HEADER_SIZE];
            memcpy(hdr, w + MUX_HEADER_SIZE, HEADER_SIZE);
            if (seal_at(k, w, hdr, (size_t)refs.v[0].size) < 0)
                goto fail;
        }
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL)
        goto fail;
    uint8_t *w = (uint8_t *)PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++) {
        TBRef *r = &refs.v[i];
        const uint8_t *f = r->obj ? (const uint8_t *)PyBytes_AS_STRING(r->obj)
                                        + MUX_HEADER_SIZE
                                  : r->ptr;
        write_mux_header(w, self->stream_id, TYPE_DATA);
        if (k != NULL) {
            memcpy(w + MUX_HEADER_SIZE + HEADER_SIZE, f + HEADER_SIZE,
                   r->size - HEADER_SIZE);
            if (seal_at(k, w, f, (size_t)r->size) < 0)
                goto fail;
        } else {
            memcpy(w + MUX_HEADER_SIZE, f, r->size);
        }
        w += MUX_HEADER_SIZE + r->size;
    }
    goto done;
fail:
    Py_CLEAR(out);
    remember_error(&s->error);
    tbscan_reset(s);
done:
    tbrefs_release(&refs);
    PyBuffer_Release(&b);
    return out;
}

static PyObject *Encoder_buffered(EncoderObject *self, PyObject *unused)
{
    return PyLong_FromSsize_t(tbscan_buffered(&self->scan));
}

static PyMethodDef Encoder_methods[] = {
    {"encode", (PyCFunction)Encoder_encode, METH_O,
     "encode(data) -> bytes: the wire bytes of every TB frame `data` completed."},
    {"buffered", (PyCFunction)Encoder_buffered, METH_NOARGS,
     "buffered() -> int: bytes of an incomplete TB frame held."},
    {NULL}};

static PyMemberDef Encoder_members[] = {
    {"last_frames", T_PYSSIZET, offsetof(EncoderObject, last_frames), READONLY,
     "TB frames the last encode() call completed (0 after a failure)."},
    {NULL}};

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tigertunnel.wire._hotpath.FrameEncoder",
    .tp_basicsize = sizeof(EncoderObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)Encoder_traverse,
    .tp_clear = (inquiry)Encoder_clear,
    .tp_free = PyObject_GC_Del,
    .tp_doc = "TB bytes of one stream in, pool-connection wire bytes out (compiled).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Encoder_init,
    .tp_dealloc = (destructor)Encoder_dealloc,
    .tp_methods = Encoder_methods,
    .tp_members = Encoder_members,
};

/* ------------------------------------------------------------------ */
/* MuxReceiver: pool-connection wire bytes -> (stream_id, type, frame). */

#define MUX_STAGE (MUX_HEADER_SIZE + SIZE_END)

typedef struct {
    uint8_t header[MUX_HEADER_SIZE];
    const uint8_t *ptr; /* the payload, in the caller's input ... */
    PyObject *obj;      /* ... or in this bytes object */
    Py_ssize_t size;
} MuxRef;

typedef struct {
    MuxRef *v;
    Py_ssize_t n, cap;
    MuxRef small[16];
} MuxRefs;

static void muxrefs_init(MuxRefs *r)
{
    r->v = r->small;
    r->n = 0;
    r->cap = 16;
}

static void muxrefs_release(MuxRefs *r)
{
    for (Py_ssize_t i = 0; i < r->n; i++)
        Py_XDECREF(r->v[i].obj);
    if (r->v != r->small)
        PyMem_Free(r->v);
    r->v = r->small;
    r->n = 0;
}

static int muxrefs_push(MuxRefs *r, const uint8_t *header, const uint8_t *ptr,
                        PyObject *obj, Py_ssize_t size)
{
    if (r->n == r->cap) {
        Py_ssize_t cap = r->cap * 2;
        MuxRef *v = PyMem_Malloc(cap * sizeof(MuxRef));
        if (v == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(v, r->v, r->n * sizeof(MuxRef));
        if (r->v != r->small)
            PyMem_Free(r->v);
        r->v = v;
        r->cap = cap;
    }
    MuxRef *m = &r->v[r->n++];
    memcpy(m->header, header, MUX_HEADER_SIZE);
    m->ptr = ptr;
    m->obj = obj;
    m->size = size;
    return 0;
}

typedef struct {
    PyObject_HEAD
    OpenerObject *opener;     /* NULL: plaintext mode */
    Py_ssize_t size_end;      /* bytes of a data frame needed to read its size */
    Py_ssize_t size_at;       /* where that size sits */
    Py_ssize_t sizes[MAX_TYPE + 1]; /* payload size by type (data: read from the frame) */
    int max_type;             /* REFERENCE_MAX_TYPE, or MAX_TYPE with the extension */
    uint8_t stage[MUX_STAGE]; /* the start of a frame whose length is not known yet */
    Py_ssize_t stage_len;
    uint8_t pend_header[MUX_HEADER_SIZE];
    Pending pend;             /* a payload of known length, incomplete */
    PyObject *error;          /* str: the first failure; the receiver is dead */
    PyObject *type_ints[MAX_TYPE + 1];
} ReceiverObject;

static int Receiver_init(ReceiverObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"opener", "extended", NULL};
    PyObject *opener;
    int extended = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|p:MuxReceiver", kwlist, &opener,
                                     &extended))
        return -1;
    if (opener != Py_None && !PyObject_TypeCheck(opener, &OpenerType)) {
        PyErr_Format(PyExc_TypeError,
                     "opener must be a compiled FrameOpener or None, not %.100s",
                     Py_TYPE(opener)->tp_name);
        return -1;
    }
    Py_CLEAR(self->opener);
    int encrypted = opener != Py_None;
    if (encrypted) {
        Py_INCREF(opener);
        self->opener = (OpenerObject *)opener;
    }
    self->size_end = MUX_HEADER_SIZE + (encrypted ? CLEAR_SIZE_OFFSET + 4 : SIZE_END);
    self->size_at = self->size_end - 4;
    self->sizes[TYPE_DATA] = -1;
    self->sizes[TYPE_OPEN] = 0;
    self->sizes[TYPE_CLOSE] = encrypted ? CLOSE_PAYLOAD_SIZE : 0;
    for (int t = TYPE_CLOSE + 1; t <= MAX_TYPE; t++)
        self->sizes[t] = CONTROL_PAYLOAD_SIZE;
    /* Version-2 control frames exist in encrypted mode only. */
    self->max_type = encrypted && extended ? MAX_TYPE : REFERENCE_MAX_TYPE;
    for (int t = 0; t <= MAX_TYPE; t++) {
        if (self->type_ints[t] == NULL) {
            self->type_ints[t] = PyLong_FromLong(t);
            if (self->type_ints[t] == NULL)
                return -1;
        }
    }
    self->stage_len = 0;
    pending_clear(&self->pend);
    self->pend.room = 0;
    Py_CLEAR(self->error);
    return 0;
}

static int Receiver_traverse(ReceiverObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->opener);
    Py_VISIT(self->pend.obj);
    Py_VISIT(self->error);
    for (int t = 0; t <= MAX_TYPE; t++)
        Py_VISIT(self->type_ints[t]);
    return 0;
}

/* What a receiver holds (an opener, bytes, a str, ints) cannot refer back
 * to it; clearing drops the buffered frame. The opener and the type ints
 * stay until dealloc, so a receiver is never left without its opener
 * (which would make it a plaintext one). */
static int Receiver_clear(ReceiverObject *self)
{
    self->stage_len = 0;
    pending_clear(&self->pend);
    Py_CLEAR(self->error);
    return 0;
}

static void Receiver_dealloc(ReceiverObject *self)
{
    PyObject_GC_UnTrack(self);
    Receiver_clear(self);
    Py_CLEAR(self->opener);
    for (int t = 0; t <= MAX_TYPE; t++)
        Py_CLEAR(self->type_ints[t]);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Look at the first `avail` bytes of a mux frame. Returns -1 (MuxError:
 * bad magic, type or size, raised as soon as the offending byte is there),
 * 0 (its length is not known yet) or 1 (*payload = its payload length). */
static int mux_head(ReceiverObject *self, const uint8_t *p, Py_ssize_t avail,
                    Py_ssize_t *payload)
{
    Py_ssize_t n = avail < 4 ? avail : 4;
    if (memcmp(p, MAGIC, n) != 0) {
        PyObject *raw = PyBytes_FromStringAndSize((const char *)p, n);
        PyObject *hex = raw ? PyObject_CallMethod(raw, "hex", NULL) : NULL;
        if (hex != NULL)
            PyErr_Format(MuxError, "bad mux magic %U", hex);
        Py_XDECREF(raw);
        Py_XDECREF(hex);
        return -1;
    }
    if (avail <= 8)
        return 0;
    uint8_t type = p[8];
    if (type > self->max_type) {
        PyErr_Format(MuxError, "bad mux frame type %d", (int)type);
        return -1;
    }
    if (avail < MUX_HEADER_SIZE)
        return 0;
    if (type != TYPE_DATA) {
        *payload = self->sizes[type];
        return 1;
    }
    if (avail < self->size_end)
        return 0;
    uint32_t size = rd32(p + self->size_at);
    if (size < MIN_FRAME_SIZE || size > MAX_FRAME_SIZE) {
        PyErr_Format(MuxError, "data frame size %u outside %d..%u", size, MIN_FRAME_SIZE,
                     MAX_FRAME_SIZE);
        return -1;
    }
    *payload = size;
    return 1;
}

/* Cut d[0:len] into mux frames appended to out; keep the incomplete rest. */
static int receiver_scan(ReceiverObject *self, const uint8_t *d, Py_ssize_t len,
                         MuxRefs *out)
{
    Py_ssize_t pos = 0, payload = 0;
    if (self->pend.obj == NULL && self->stage_len > 0) {
        Py_ssize_t before = self->stage_len;
        Py_ssize_t take = MUX_STAGE - before;
        if (take > len)
            take = len;
        memcpy(self->stage + before, d, take);
        self->stage_len += take;
        int r = mux_head(self, self->stage, self->stage_len, &payload);
        if (r < 0)
            return -1;
        if (r == 0)
            return 0; /* everything went into the stage */
        Py_ssize_t total = MUX_HEADER_SIZE + payload;
        if (self->stage_len >= total) {
            /* Whole in the stage; what is past it belongs to the next frame. */
            PyObject *obj = NULL;
            if (payload > 0) {
                obj = PyBytes_FromStringAndSize((const char *)self->stage + MUX_HEADER_SIZE,
                                                payload);
                if (obj == NULL)
                    return -1;
            }
            if (muxrefs_push(out, self->stage, NULL, obj, payload) < 0) {
                Py_XDECREF(obj);
                return -1;
            }
            pos = total - before;
            self->stage_len = 0;
        } else {
            memcpy(self->pend_header, self->stage, MUX_HEADER_SIZE);
            if (pending_start(&self->pend, payload, self->stage + MUX_HEADER_SIZE,
                              self->stage_len - MUX_HEADER_SIZE) < 0)
                return -1;
            pos = take;
            self->stage_len = 0;
        }
    }
    if (self->pend.obj != NULL) {
        Py_ssize_t took = pending_add(&self->pend, d + pos, len - pos);
        if (took < 0)
            return -1;
        pos += took;
        if (self->pend.have < self->pend.size)
            return 0;
        if (muxrefs_push(out, self->pend_header, NULL, self->pend.obj, self->pend.size) < 0)
            return -1;
        self->pend.obj = NULL;
        self->pend.size = self->pend.have = 0;
    }
    while (pos < len) {
        Py_ssize_t avail = len - pos;
        int r = mux_head(self, d + pos, avail, &payload);
        if (r < 0)
            return -1;
        if (r == 0) {
            memcpy(self->stage, d + pos, avail);
            self->stage_len = avail;
            return 0;
        }
        if (avail < MUX_HEADER_SIZE + payload) {
            memcpy(self->pend_header, d + pos, MUX_HEADER_SIZE);
            return pending_start(&self->pend, payload, d + pos + MUX_HEADER_SIZE,
                                 avail - MUX_HEADER_SIZE);
        }
        if (muxrefs_push(out, d + pos, d + pos + MUX_HEADER_SIZE, NULL, payload) < 0)
            return -1;
        pos += MUX_HEADER_SIZE + payload;
    }
    return 0;
}

/* The payload of one complete mux frame as the receiver hands it out:
 * decrypted and rebuilt if it is sealed, else as received. */
static PyObject *receiver_payload(ReceiverObject *self, MuxRef *m)
{
    if (m->size == 0)
        return PyBytes_FromStringAndSize(NULL, 0);
    const uint8_t *src = m->obj ? (const uint8_t *)PyBytes_AS_STRING(m->obj) : m->ptr;
    if (self->opener == NULL) {
        if (m->obj != NULL) {
            PyObject *o = m->obj;
            m->obj = NULL;
            return o;
        }
        return PyBytes_FromStringAndSize((const char *)src, m->size);
    }
    if (check_encrypted(src, m->size) < 0)
        return NULL;
    PyObject *o;
    if (m->obj != NULL) {
        o = m->obj;
        m->obj = NULL;
    } else {
        o = PyBytes_FromStringAndSize(NULL, m->size);
        if (o == NULL)
            return NULL;
    }
    uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(o);
    if (open_into(&self->opener->keys, self->opener->cluster, dst, src, (size_t)m->size,
                  m->header) < 0) {
        Py_DECREF(o);
        return NULL;
    }
    return o;
}

static PyObject *Receiver_feed(ReceiverObject *self, PyObject *data)
{
    if (self->error != NULL) {
        PyErr_Format(MuxError, "mux receiver already failed: %U", self->error);
        return NULL;
    }
    Py_buffer b;
    if (PyObject_GetBuffer(data, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    MuxRefs refs;
    muxrefs_init(&refs);
    PyObject *list = NULL;
    /* Every header of this read is checked before anything is opened. */
    if (receiver_scan(self, b.buf, b.len, &refs) < 0)
        goto fail;
    list = PyList_New(refs.n);
    if (list == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < refs.n; i++) {
        MuxRef *m = &refs.v[i];
        PyObject *payload = receiver_payload(self, m);
        if (payload == NULL)
            goto fail;
        PyObject *sid = PyLong_FromUnsignedLong(rd32(m->header + 4));
        if (sid == NULL) {
            Py_DECREF(payload);
            goto fail;
        }
        PyObject *type = self->type_ints[m->header[8]];
        Py_INCREF(type);
        PyObject *item = PyTuple_New(3);
        if (item == NULL) {
            Py_DECREF(sid);
            Py_DECREF(type);
            Py_DECREF(payload);
            goto fail;
        }
        PyTuple_SET_ITEM(item, 0, sid);
        PyTuple_SET_ITEM(item, 1, type);
        PyTuple_SET_ITEM(item, 2, payload);
        PyList_SET_ITEM(list, i, item);
    }
    goto done;
fail:
    Py_CLEAR(list);
    remember_error(&self->error);
    self->stage_len = 0;
    pending_clear(&self->pend);
done:
    muxrefs_release(&refs);
    PyBuffer_Release(&b);
    return list;
}

static PyObject *Receiver_buffered(ReceiverObject *self, PyObject *unused)
{
    return PyLong_FromSsize_t(self->pend.obj ? MUX_HEADER_SIZE + self->pend.have
                                             : self->stage_len);
}

static PyMethodDef Receiver_methods[] = {
    {"feed", (PyCFunction)Receiver_feed, METH_O,
     "feed(data) -> [(stream_id, frame_type, payload)]: every mux frame `data` "
     "completed, sealed payloads opened."},
    {"buffered", (PyCFunction)Receiver_buffered, METH_NOARGS,
     "buffered() -> int: bytes of an incomplete mux frame held."},
    {NULL}};

static PyTypeObject ReceiverType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tigertunnel.wire._hotpath.MuxReceiver",
    .tp_basicsize = sizeof(ReceiverObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)Receiver_traverse,
    .tp_clear = (inquiry)Receiver_clear,
    .tp_free = PyObject_GC_Del,
    .tp_doc = "Pool-connection wire bytes in, opened mux frames out (compiled).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Receiver_init,
    .tp_dealloc = (destructor)Receiver_dealloc,
    .tp_methods = Receiver_methods,
};

/* ------------------------------------------------------------------ */
/* Module                                                              */

static PyObject *bind_aegis(PyObject *module, PyObject *args)
{
    unsigned long long enc, dec;
    if (!PyArg_ParseTuple(args, "KK:bind_aegis", &enc, &dec))
        return NULL;
    if (enc == 0 || dec == 0) {
        PyErr_SetString(PyExc_ValueError, "bind_aegis needs two non-null addresses");
        return NULL;
    }
    aegis_encrypt = (aegis_encrypt_fn)(uintptr_t)enc;
    aegis_decrypt = (aegis_decrypt_fn)(uintptr_t)dec;
    Py_RETURN_NONE;
}

#ifdef TIGERTUNNEL_SANITIZE
/* Only in the sanitizer build (setup.py, TIGERTUNNEL_SANITIZE=1): commit
 * one memory error or undefined behaviour on purpose, so the fuzz
 * environment can show that ASan and UBSan really watch this module (the
 * call must abort the process). Never compiled into a normal build. */
static PyObject *sanitizer_selftest(PyObject *module, PyObject *arg)
{
    const char *kind = PyUnicode_AsUTF8(arg);
    if (kind == NULL)
        return NULL;
    if (strcmp(kind, "heap-read") == 0) {
        volatile Py_ssize_t past = 16;
        uint8_t *block = PyMem_Malloc(16);
        if (block == NULL)
            return PyErr_NoMemory();
        memset(block, 0, 16);
        uint8_t byte = block[past]; /* one byte past the block */
        PyMem_Free(block);
        return PyLong_FromLong(byte);
    }
    if (strcmp(kind, "shift") == 0) {
        volatile int bits = 40;
        return PyLong_FromLong(1 << bits); /* shift wider than an int */
    }
    PyErr_Format(PyExc_ValueError, "unknown self-test %R", arg);
    return NULL;
}
#endif

static PyMethodDef module_methods[] = {
    {"bind_aegis", bind_aegis, METH_VARARGS,
     "bind_aegis(encrypt_address, decrypt_address): the addresses of libaegis' "
     "aegis128x2_encrypt_detached and aegis128x2_decrypt_detached."},
#ifdef TIGERTUNNEL_SANITIZE
    {"_sanitizer_selftest", sanitizer_selftest, METH_O,
     "_sanitizer_selftest(kind): a deliberate heap over-read ('heap-read') or "
     "undefined shift ('shift'); sanitizer build only."},
#endif
    {NULL}};

/* What the compiler applied to this module, from its predefined macros
 * (setup.py asks for each where the toolchain has it). */
static PyObject *build_features(void)
{
    const char *names[8];
    int n = 0;
#if defined(__SSP_STRONG__)
    names[n++] = "stack-protector-strong";
#elif defined(__SSP_ALL__) || defined(__SSP__)
    names[n++] = "stack-protector";
#endif
#if defined(__USE_FORTIFY_LEVEL) && __USE_FORTIFY_LEVEL > 0
    names[n++] = __USE_FORTIFY_LEVEL >= 3 ? "fortify-3" : __USE_FORTIFY_LEVEL == 2
        ? "fortify-2" : "fortify-1";
#endif
#if defined(__CET__)
    names[n++] = "cf-protection";
#endif
#if defined(__SANITIZE_ADDRESS__)
    names[n++] = "address-sanitizer";
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
    names[n++] = "address-sanitizer";
#endif
#endif
#ifdef TIGERTUNNEL_SANITIZE
    names[n++] = "sanitizer-selftest";
#endif
    PyObject *t = PyTuple_New(n);
    if (t == NULL)
        return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *s = PyUnicode_FromString(names[i]);
        if (s == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, s);
    }
    return t;
}

/* The build's identity: the SHA-256 of the _hotpath.c it was compiled
 * from, which setup.py computes and passes in. */
#ifndef TIGERTUNNEL_SOURCE_SHA256
#define TIGERTUNNEL_SOURCE_SHA256 ""
#endif

/* The wire facts this module was compiled with, exported as module
 * attributes of the same names: tigertunnel.wire.implementation compares
 * each with the Python value and refuses the module on any difference. */
static const struct {
    const char *name;
    long value;
} WIRE_CONSTANTS[] = {
    {"HEADER_SIZE", HEADER_SIZE},
    {"MIN_FRAME_SIZE", MIN_FRAME_SIZE},
    {"MAX_FRAME_SIZE", (long)MAX_FRAME_SIZE},
    {"SIZE_OFFSET", SIZE_OFFSET},
    {"SIZE_END", SIZE_END},
    {"MUX_HEADER_SIZE", MUX_HEADER_SIZE},
    {"TAG_SIZE", TAG_SIZE},
    {"KEY_SIZE", KEY_SIZE},
    {"NONCE_SIZE", NONCE_SIZE},
    {"CLEAR_SIZE_OFFSET", CLEAR_SIZE_OFFSET},
    {"CIPHERTEXT_OFFSET", CIPHERTEXT_OFFSET},
    {"CLOSE_PAYLOAD_SIZE", CLOSE_PAYLOAD_SIZE},
    {"CONTROL_PAYLOAD_SIZE", CONTROL_PAYLOAD_SIZE},
    {"TYPE_DATA", TYPE_DATA},
    {"TYPE_OPEN", TYPE_OPEN},
    {"TYPE_CLOSE", TYPE_CLOSE},
    {"REFERENCE_MAX_TYPE", REFERENCE_MAX_TYPE},
    {"MAX_TYPE", MAX_TYPE},
};

static int add_constants(PyObject *m)
{
    size_t n = sizeof WIRE_CONSTANTS / sizeof WIRE_CONSTANTS[0];
    for (size_t i = 0; i < n; i++)
        if (PyModule_AddIntConstant(m, WIRE_CONSTANTS[i].name, WIRE_CONSTANTS[i].value) < 0)
            return -1;
    PyObject *magic = PyBytes_FromStringAndSize((const char *)MAGIC, sizeof MAGIC);
    if (magic == NULL || PyModule_AddObject(m, "MAGIC", magic) < 0) {
        Py_XDECREF(magic);
        return -1;
    }
    return PyModule_AddStringConstant(m, "BUILD_HASH", TIGERTUNNEL_SOURCE_SHA256);
}

static struct PyModuleDef hotpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "tigertunnel.wire._hotpath",
    .m_doc = "The per-frame data path of tigertunnel, compiled (see tigertunnel.wire.datapath).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__hotpath(void)
{
    PyObject *errors = PyImport_ImportModule("tigertunnel.errors");
    if (errors == NULL)
        return NULL;
    TunnelError = PyObject_GetAttrString(errors, "TunnelError");
    FrameError = PyObject_GetAttrString(errors, "FrameError");
    ClusterMismatchError = PyObject_GetAttrString(errors, "ClusterMismatchError");
    MuxError = PyObject_GetAttrString(errors, "MuxError");
    AuthenticationError = PyObject_GetAttrString(errors, "AuthenticationError");
    Py_DECREF(errors);
    if (!TunnelError || !FrameError || !ClusterMismatchError || !MuxError
        || !AuthenticationError)
        return NULL;
    PyTypeObject *types[] = {&SealerType, &OpenerType, &ParserType, &EncoderType,
                             &ReceiverType};
    const char *names[] = {"FrameSealer", "FrameOpener", "FrameParser", "FrameEncoder",
                           "MuxReceiver"};
    for (int i = 0; i < 5; i++)
        if (PyType_Ready(types[i]) < 0)
            return NULL;
    PyObject *m = PyModule_Create(&hotpath_module);
    if (m == NULL)
        return NULL;
    for (int i = 0; i < 5; i++) {
        Py_INCREF(types[i]);
        if (PyModule_AddObject(m, names[i], (PyObject *)types[i]) < 0) {
            Py_DECREF(types[i]);
            Py_DECREF(m);
            return NULL;
        }
    }
    if (add_constants(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyObject *features = build_features();
    if (features == NULL || PyModule_AddObject(m, "BUILD_FEATURES", features) < 0) {
        Py_XDECREF(features);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
