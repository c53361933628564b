# fmtune container image: the core and the plugins named in PLUGINS, installed from the lock
# (requirements/lock.txt as pip constraints), run as a non-root user, `fmtune` as entry point.
# docs/distributed.md ("Container image") describes the variants and how to build them.
#
#   CPU (default; torch's CPU wheels):
#     docker build -t fmtune:0.1.0-cpu .
#   GPU (torch's CUDA wheels from PyPI, which carry the CUDA user-space libraries; the
#   driver comes from the host through the NVIDIA container toolkit):
#     docker build --build-arg VARIANT=cuda -t fmtune:0.1.0 .
#   More plugins (folders under plugins/):
#     docker build --build-arg PLUGINS="peft_lora aim_tracker data_handlers" -t fmtune .
#
# Two stages: the builder makes the virtual environment /opt/fmtune (pip, wheel building);
# the final image copies only that environment onto a fresh base, with pip and setuptools
# removed from it: no compiler, no pip cache, no source tree.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG BASE_IMAGE=${PYTHON_IMAGE}

FROM ${PYTHON_IMAGE} AS builder
# cpu: torch from TORCH_CPU_INDEX (PyTorch's CPU-only wheels, ~200 MB instead of ~3 GB);
# cuda: torch from the default index, where the Linux wheels are CUDA builds
ARG VARIANT=cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG PLUGINS="peft_lora"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY requirements/lock.txt requirements/lock.txt
RUN python -m venv /opt/fmtune
# torch first and alone (as the Makefile does): the lock pins its version, the variant its build
RUN set -eu; \
    torch_pin="$(grep -E '^torch==' requirements/lock.txt)"; \
    if [ "$VARIANT" = cpu ]; then \
        /opt/fmtune/bin/pip install --no-cache-dir --index-url "$TORCH_CPU_INDEX" "$torch_pin"; \
    elif [ "$VARIANT" = cuda ]; then \
        /opt/fmtune/bin/pip install --no-cache-dir "$torch_pin"; \
    else \
        echo "VARIANT must be cpu or cuda, not $VARIANT" >&2; exit 1; \
    fi
COPY pyproject.toml README.md ./
COPY core core
COPY plugins plugins
RUN set -eu; \
    set -- .; \
    for p in $PLUGINS; do \
        test -f "plugins/$p/pyproject.toml" || { echo "no plugin folder plugins/$p" >&2; exit 1; }; \
        set -- "$@" "./plugins/$p"; \
    done; \
    /opt/fmtune/bin/pip install --no-cache-dir --constraint requirements/lock.txt "$@"; \
    /opt/fmtune/bin/pip uninstall --yes pip setuptools wheel; \
    find /opt/fmtune -name __pycache__ -type d -prune -exec rm -rf {} +

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="fmtune" \
      org.opencontainers.image.description="Plugin-based fine-tuning of Hugging Face causal LMs" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 1000 fmtune \
    && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin fmtune
COPY --from=builder /opt/fmtune /opt/fmtune
ENV PATH=/opt/fmtune/bin:$PATH \
    HF_HOME=/home/fmtune/.cache/huggingface \
    PYTHONUNBUFFERED=1
USER 1000:1000
WORKDIR /home/fmtune
ENTRYPOINT ["fmtune"]
CMD ["--help"]
