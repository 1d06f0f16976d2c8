# Build and run blockd. The image serves QMP on /run/blockd/qmp.sock for a disk image mounted at
# /data/disk.qcow2 (created empty, 10 GiB, when absent):
#   docker build -t blockd .
#   docker run -v $PWD/data:/data -v $PWD/run:/run/blockd blockd
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p blockd

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends qemu-utils && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/blockd /usr/local/bin/blockd
VOLUME ["/data", "/run/blockd"]
CMD ["sh", "-c", "test -e /data/disk.qcow2 || qemu-img create -f qcow2 /data/disk.qcow2 10G; exec blockd --image /data/disk.qcow2 --qmp /run/blockd/qmp.sock --nbd /run/blockd/nbd.sock"]
