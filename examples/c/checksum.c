// A wasmgate handler in freestanding C (guest ABI v1, no libc): replies with the
// CRC-32 (IEEE 802.3, as zlib and Ethernet compute it) of the datagram, as eight
// lowercase hex digits. A client sends data and checks what the gateway received.
//
// Build (Debian: apt install clang lld):
//   clang --target=wasm32 -O2 -s -nostdlib -Wl,--no-entry -Wl,--strip-all \
//     -o examples/c/checksum.wasm examples/c/checksum.c
// (scripts/build-guests.sh adds -ffile-prefix-map, so no path of the checkout is kept)

#define MAX_DATAGRAM 65507

typedef unsigned char u8;
typedef unsigned int u32;
typedef long long i64;

static u8 datagram[MAX_DATAGRAM];
static u8 reply[8];
static u32 table[256];
static int table_ready;

// Optional host import: a log line at debug level (3) for each datagram.
__attribute__((import_module("wasmgate"), import_name("log")))
void wasmgate_log(int level, const char *ptr, int len);

static void fill_table(void) {
    for (u32 n = 0; n < 256; n++) {
        u32 c = n;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        table[n] = c;
    }
    table_ready = 1;
}

// ABI v1: where the host copies a datagram of `len` bytes.
__attribute__((export_name("alloc")))
int alloc(int len) {
    return len >= 0 && len <= MAX_DATAGRAM ? (int)datagram : 0;
}

// ABI v1: the reply is (pointer << 32) | length.
__attribute__((export_name("handle")))
i64 handle(const u8 *ptr, int len) {
    if (!table_ready)
        fill_table();
    u32 crc = 0xFFFFFFFFu;
    for (int i = 0; i < len; i++)
        crc = table[(crc ^ ptr[i]) & 0xFF] ^ (crc >> 8);
    crc ^= 0xFFFFFFFFu;
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 8; i++)
        reply[i] = hex[(crc >> (28 - 4 * i)) & 0xF];
    static const char msg[] = "checksum: one datagram";
    wasmgate_log(3, msg, sizeof msg - 1);
    return ((i64)(u32)reply << 32) | 8;
}
