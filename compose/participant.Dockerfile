# The order example's participants (`order-participant inventory|payment|shipping`) from a
# release build. Build context: the repository root, after
# `cargo build --release -p order-fulfilment --bin order-participant`.
FROM debian:trixie-slim
RUN useradd --system --no-create-home --shell /usr/sbin/nologin sagaflow
COPY target/release/order-participant /usr/local/bin/order-participant
USER sagaflow
STOPSIGNAL SIGTERM
ENTRYPOINT ["order-participant"]
