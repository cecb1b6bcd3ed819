# A crowdtrain node for GPU owners: CUDA PyTorch from the base image, crowdtrain on top.
#
#   docker build -f docker/node.Dockerfile -t crowdtrain-node .
#   docker run --gpus all --network host -v crowdtrain-node:/home/crowdtrain/.crowdtrain \
#       crowdtrain-node join http://COORDINATOR:8470 --run RUN_ID
#
# Any pytorch/pytorch "-runtime" tag with torch 2.11 to 2.13 (the range pyproject.toml
# allows) works as the base: pick the CUDA version your driver supports with
# --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /tmp/crowdtrain
COPY pyproject.toml README.md LICENSE ./
COPY protocol ./protocol
COPY model ./model
COPY node ./node
COPY coordinator ./coordinator
# The base image's torch is built for its CUDA: pin pip to exactly that build, so
# installing crowdtrain can never swap it for another one.
RUN python -c "from importlib.metadata import version; print('torch==' + version('torch'))" \
        > /tmp/torch-constraint.txt \
    && pip install --constraint /tmp/torch-constraint.txt . \
    && python -c "import crowdtrain.node, torch; print('crowdtrain node on torch', torch.__version__)" \
    && rm -rf /tmp/crowdtrain /tmp/torch-constraint.txt

# Run as a plain user; its home holds the node's identity key and shard cache.
RUN useradd --create-home crowdtrain \
    && mkdir -p /home/crowdtrain/.crowdtrain \
    && chown -R crowdtrain:crowdtrain /home/crowdtrain
USER crowdtrain
WORKDIR /home/crowdtrain
# Keep this volume between runs: the identity it holds is what the ledger credits.
VOLUME ["/home/crowdtrain/.crowdtrain"]

ENTRYPOINT ["crowdtrain-node"]
CMD ["--help"]
