# The crowdtrain coordinator: gRPC for nodes, HTTP (dashboard, API, downloads), a DHT peer.
#
#   docker build -f docker/coordinator.Dockerfile -t crowdtrain-coordinator .
#   docker run -v crowdtrain-coordinator:/data -p 8470:8470 -p 8471:8471 -p 8472:8472 \
#       crowdtrain-coordinator serve --data-dir /data --host 0.0.0.0 --public-host PUBLIC_IP \
#       --tls-cert /data/fullchain.pem --tls-key /data/privkey.pem  # or --insecure behind a TLS proxy
#
# The coordinator never trains: torch is only needed to keep checkpoints and spot-check.
# Its default build carries CUDA libraries; for a smaller image pass a CPU-only wheel
# index with --build-arg TORCH_INDEX_URL=...
FROM python:3.11-slim

ARG TORCH_INDEX_URL=""
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

WORKDIR /tmp/crowdtrain
COPY pyproject.toml README.md LICENSE ./
COPY protocol ./protocol
COPY model ./model
COPY node ./node
COPY coordinator ./coordinator
# The constraint keeps the torch installed above, whatever crowdtrain's range allows.
RUN echo "torch==2.13.0" > /tmp/torch-constraint.txt \
    && pip install --constraint /tmp/torch-constraint.txt . \
    && rm -rf /tmp/crowdtrain /tmp/torch-constraint.txt

# The demo run's spec (docker/compose.yaml publishes it).
COPY examples/stdlib-tiny.toml examples/stdlib-diloco.toml /opt/crowdtrain/examples/

RUN useradd --create-home crowdtrain \
    && mkdir -p /data \
    && chown crowdtrain:crowdtrain /data
USER crowdtrain
WORKDIR /home/crowdtrain
# The coordinator's own folder: its key, admin key, database, checkpoints (and, in the
# demo, the prepared corpus). Keep it: a coordinator restart then loses nothing.
VOLUME ["/data"]

# HTTP, gRPC and the DHT: `serve`'s --http-port, --grpc-port and --dht-port defaults.
EXPOSE 8470 8471 8472
# slim has no curl: ask with Python's own urllib (any error or non-200 answer fails).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8470/healthz', timeout=4)"]

ENTRYPOINT ["crowdtrain-coordinator"]
CMD ["serve", "--data-dir", "/data", "--host", "0.0.0.0", "--insecure"]
