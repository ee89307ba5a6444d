# syntax=docker/dockerfile:1
# One image for every role: `stowage controller`, `stowage node`, `stowage nfs-server`
# (the Helm chart passes the subcommand as args).
#
#   docker build -t REGISTRY/stowage:TAG .

ARG RUST_VERSION=1.95
ARG DEBIAN=trixie

# Build: protos are compiled by protox in build.rs (no protoc); aws-lc-sys needs only
# the C compiler the slim Rust image has.
FROM rust:${RUST_VERSION}-slim-${DEBIAN} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin stowage \
    && install -D -m 0755 target/release/stowage /out/stowage

# Run: what the node plugin executes on the host's devices and mounts
# (mount/umount, blkid, mkfs.ext4/ext3, mkfs.xfs, resize2fs, xfs_growfs, mount.nfs),
# and CA certificates for the AWS APIs.
FROM debian:${DEBIAN}-slim
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       ca-certificates mount util-linux e2fsprogs xfsprogs nfs-common \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/stowage /usr/local/bin/stowage
ENTRYPOINT ["/usr/local/bin/stowage"]
