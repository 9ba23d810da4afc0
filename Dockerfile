# syntax=docker/dockerfile:1
# The illume server image: the package with its generated gRPC stubs and the default model, on the
# torch build chosen at build time. Used for every Ray container (head, serving and training
# workers), the round trigger and `illume serve`.
#
#   docker build -t registry.example.com/illume:0.1.0-cpu .                                (CPU)
#   docker build --build-arg TORCH_VARIANT=cu128 -t registry.example.com/illume:0.1.0-cu128 .
#
# TORCH_VARIANT names a PyTorch wheel index (cpu, cu126, cu128, ...); the CUDA libraries come in
# the wheels, the driver from the node (NVIDIA device plugin). The default model must be in the
# source tree (illume/default_model/) when the image is built.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# -- build: generate the stubs (never committed) and build the wheel --------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
RUN pip install -c constraints.txt grpcio-tools "setuptools>=69" wheel
COPY protos ./protos
COPY illume ./illume
COPY services ./services
RUN rm -rf illume/v1 && mkdir -p illume/v1 \
    && python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. \
        protos/illume/v1/*.proto \
    && printf '"""Generated from protos/illume/v1 at image build (never committed)."""\n' \
        > illume/v1/__init__.py
RUN if [ -z "$(ls -A illume/default_model 2>/dev/null)" ]; then \
        echo "illume/default_model/ is missing or empty: build the default model first" >&2; exit 1; \
    fi
RUN pip wheel --no-deps --no-build-isolation -w /wheels . \
    && python -c "import sys, zipfile, glob; n = zipfile.ZipFile(glob.glob('/wheels/illume-*.whl')[0]).namelist(); \
sys.exit(0 if 'illume/v1/illume_pb2.py' in n and any(x.startswith('illume/default_model/') for x in n) else 1)"

# -- runtime --------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
# Where the packaged default model is linked (generator.model.path in k8s/overlays/*/app-config.yaml).
ENV ILLUME_DEFAULT_MODEL=/opt/illume/default-model
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# wget: KubeRay's and our readiness probes; a JRE: pycocoevalcap's METEOR in the promotion gate.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget ca-certificates openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*
# Into the system interpreter (/usr/local), not a venv: KubeRay starts Ray through `bash -l`,
# whose profile resets PATH, and /usr/local/bin stays on it.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}"
COPY --from=build /src/constraints.txt /tmp/constraints.txt
COPY --from=build /wheels /tmp/wheels
RUN pip install -c /tmp/constraints.txt /tmp/wheels/illume-*.whl \
    && rm -rf /tmp/wheels /tmp/constraints.txt \
    && mkdir -p /opt/illume \
    && ln -s "$(python -c 'import illume, pathlib; print(pathlib.Path(illume.__file__).parent / "default_model")')" \
        "$ILLUME_DEFAULT_MODEL" \
    && python -c "import illume.v1.illume_pb2_grpc, services.app, ray; print('ray', ray.__version__)"
# The non-root user every pod runs as (runAsUser 1000 in k8s/).
RUN groupadd --gid 1000 ray && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash ray
USER 1000:1000
WORKDIR /home/ray
EXPOSE 50051 8000 8265 10001 6379 8080
CMD ["illume", "serve", "--data-dir", "/home/ray/data"]
