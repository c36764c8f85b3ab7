# flashgate's container image: a build stage, then a slim runtime with
# flashgate, order-core, the guest filters and the example configs.
#
#   docker build -t flashgate:0.1.0 .
#   docker run --rm -p 8080:8080 flashgate:0.1.0 demo --listen 0.0.0.0:8080 --no-tls
#
# Kubernetes runs it as deploy/gateway.yaml says (docs/deploy.md). No
# HEALTHCHECK: the kubelet's probes on /healthz and /readyz do that job.
# tests/tests/container_image.rs checks that every path copied here exists.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# The guest filters (and the demo's embedded one, gateway/build.rs) need it.
RUN rustup target add wasm32-wasip1
COPY Cargo.toml Cargo.lock ./
COPY gateway gateway
COPY filters filters
COPY order-core order-core
COPY tests tests
COPY bench/hello bench/hello
COPY wasm-plugins wasm-plugins
COPY config config
ENV CARGO_TARGET_DIR=/src/target
# Two builds: the gateway embeds the order core without its production back
# ends, the order-core binary has them (one build would unify the features
# and put Redis and RocketMQ clients into flashgate).
RUN cargo build --release --locked -p gateway \
 && cargo build --release --locked -p order-core
RUN bash wasm-plugins/build.sh --locked \
 && mkdir -p /out/filters \
 && for f in add_headers bot_score checkout_guard degrade_recommendations strip_heavy_fields; do \
        cp "wasm-plugins/target/wasm32-wasip1/release/$f.wasm" /out/filters/; \
    done

# glibc and libgcc, no shell, no package manager; user 65532 ("nonroot"),
# the runAsUser of deploy/gateway.yaml.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/flashgate /usr/local/bin/flashgate
COPY --from=build /src/target/release/order-core /usr/local/bin/order-core
COPY --from=build /out/filters/ /usr/lib/flashgate/filters/
COPY --from=build /src/config/ /etc/flashgate/examples/
USER 65532:65532
EXPOSE 8080 9901
ENTRYPOINT ["/usr/local/bin/flashgate"]
CMD ["run", "--config", "/etc/flashgate/flashgate.toml"]
