# Multi-stage build of the chatd binary. protoc is vendored by the build, so
# the builder needs nothing beyond the Rust image.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p chatd \
 && cp target/release/chatd /chatd

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 chatd
COPY --from=build /chatd /usr/local/bin/chatd
USER chatd
EXPOSE 8080 50051
ENTRYPOINT ["/usr/local/bin/chatd"]
