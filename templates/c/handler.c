// {{name}}: a wasmgate handler in freestanding C (guest ABI v1, docs/ABI.md).
//
// The host copies each datagram to the buffer `alloc` returns, then calls
// `handle`, which returns the reply as (pointer << 32) | length, or -1 for
// no reply.

#define MAX_DATAGRAM 65507

static unsigned char buffer[MAX_DATAGRAM];

__attribute__((export_name("alloc")))
int alloc(int len) {
    return len >= 0 && len <= MAX_DATAGRAM ? (int)buffer : 0;
}

__attribute__((export_name("handle")))
long long handle(unsigned char *ptr, int len) {
    for (int i = 0; i < len; i++)
        if (ptr[i] >= 'a' && ptr[i] <= 'z')
            ptr[i] -= 'a' - 'A';
    return ((long long)(int)ptr << 32) | (unsigned)len;
}
