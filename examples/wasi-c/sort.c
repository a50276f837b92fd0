// A wasmgate handler as a WASI command in C with wasi-libc: sorts the lines of the
// datagram, like sort(1). The datagram is stdin, stdout is the reply, and a
// non-zero exit sends nothing. Binary input (a NUL byte) is refused with a
// message on stderr, which reaches the gateway's log.
//
// Build (Debian: apt install clang lld wasi-libc libclang-rt-14-dev-wasm32):
//   clang --target=wasm32-wasi -O2 -s -o examples/wasi-c/sort.wasm examples/wasi-c/sort.c

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DATAGRAM 65507
#define MAX_LINES (MAX_DATAGRAM + 1)

static char input[MAX_DATAGRAM + 1];
static char *lines[MAX_LINES];

static int compare(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int main(void) {
    size_t len = fread(input, 1, sizeof input, stdin);
    if (len > MAX_DATAGRAM) {
        fprintf(stderr, "sort: more than %d bytes on stdin\n", MAX_DATAGRAM);
        return 1;
    }
    if (memchr(input, '\0', len) != NULL) {
        fprintf(stderr, "sort: binary input (a NUL byte), not sorting it\n");
        return 1;
    }
    // A final newline ends the last line; it does not start an empty one.
    int ends_with_newline = len > 0 && input[len - 1] == '\n';
    if (ends_with_newline)
        len--;
    input[len] = '\0';

    size_t count = 0;
    if (len > 0 || ends_with_newline) {
        char *line = input;
        for (;;) {
            lines[count++] = line;
            char *newline = strchr(line, '\n');
            if (newline == NULL)
                break;
            *newline = '\0';
            line = newline + 1;
        }
    }
    qsort(lines, count, sizeof lines[0], compare);
    for (size_t i = 0; i < count; i++) {
        fputs(lines[i], stdout);
        if (i + 1 < count || ends_with_newline)
            fputc('\n', stdout);
    }
    return 0;
}
