# syntax=docker/dockerfile:1
# One image for every role: `stowage controller`, `stowage node`, `stowage nfs-server`
# (the Helm chart passes the subcommand as args).
#
#   docker build -t REGISTRY/stowage:TAG .

ARG RUST_VERSION=1.95
ARG DEBIAN=trixie

# Build: the workspace (the binary in src/, its crates in crates/); the top-level protos
# (proto/) are compiled by protox in crates/api/build.rs (no protoc); aws-lc-sys needs only the C compiler
# the slim Rust image has.
FROM rust:${RUST_VERSION}-slim-${DEBIAN} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY proto proto
COPY src src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin stowage \
    && install -D -m 0755 target/release/stowage /out/stowage

# Run: what the node plugin executes on the host's devices and mounts
# (mount/umount, blkid, mkfs.ext4/ext3, mkfs.xfs, resize2fs, xfs_growfs, mount.nfs with
# /etc/protocols), and CA certificates for the AWS APIs. The packages are listed once,
# in image/runtime-packages, and what they pull in that nothing runs (python3 and ICU,
# for xfs_scrub) in image/runtime-excludes; tests/e2e/image builds the same image
# without a registry from those lists, this stage's Debian release and its ENTRYPOINT.
FROM debian:${DEBIAN}-slim
RUN --mount=type=bind,source=image/runtime-packages,target=/tmp/runtime-packages \
    --mount=type=bind,source=image/runtime-excludes,target=/tmp/runtime-excludes \
    apt-get update \
    && sed -e 's/#.*//' /tmp/runtime-packages \
       | DEBIAN_FRONTEND=noninteractive xargs apt-get install -y --no-install-recommends \
    && sed -e 's/#.*//' /tmp/runtime-excludes | xargs dpkg --purge --force-depends \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/stowage /usr/local/bin/stowage
ENTRYPOINT ["/usr/local/bin/stowage"]
