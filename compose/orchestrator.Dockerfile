# An orchestrator node (`sagaflow serve`) from a release build.
# Build context: the repository root, after `cargo build --release -p sagaflow`.
FROM debian:trixie-slim
RUN useradd --system --no-create-home --shell /usr/sbin/nologin sagaflow
COPY target/release/sagaflow /usr/local/bin/sagaflow
USER sagaflow
# Inside a container the API must listen on every interface; the compose file sets the token.
ENV SAGAFLOW_API_ADDR=0.0.0.0:8080
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["sagaflow"]
CMD ["serve"]
