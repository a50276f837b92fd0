# Multi-stage build: compile in the Rust image, run from a slim Debian image.
#   docker build -t wasmgate .
#   docker run --rm -p 8008:8008/udp wasmgate --listen 0.0.0.0:8008
# The committed guest .wasm is embedded, so no wasm toolchain is needed here.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY guest/uppercase.wasm ./guest/uppercase.wasm
# Built into the binary: the WIT worlds (bindgen!) and `wasmgate new`'s templates.
COPY wit ./wit
COPY templates ./templates
COPY examples ./examples
COPY tests ./tests
COPY README.md ./
RUN cargo build --release --locked --bin wasmgate

FROM debian:bookworm-slim
RUN useradd --system --no-create-home --shell /usr/sbin/nologin wasmgate
COPY --from=build /src/target/release/wasmgate /usr/local/bin/wasmgate
USER wasmgate
EXPOSE 8008/udp 9090/tcp
ENTRYPOINT ["/usr/local/bin/wasmgate"]
CMD ["--listen", "0.0.0.0:8008", "--metrics", "0.0.0.0:9090"]
