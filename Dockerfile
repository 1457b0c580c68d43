# syntax=docker/dockerfile:1
# The podkit image: `podkit` and every backend driver, non-root, for a read-only root
# filesystem. Targets:
#   podkit    (default) runs podkit's components:  docker build -t REGISTRY/podkit:VERSION .
#   examples  adds examples/ under /app, the image `podkit k8s --image` names for the
#             example specs:  docker build --target examples -t REGISTRY/podkit-examples:VERSION .
ARG PYTHON=3.11

FROM python:${PYTHON}-slim-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY src ./src
# wheels for every dependency, then podkit's own with the proxy's hot path compiled by mypyc
# (PODKIT_COMPILE=1, setup.py; mypyc type-checks against the installed dependencies, hence
# no build isolation), so the final stage needs no compiler and no cache
RUN pip install --no-cache-dir 'setuptools>=77' 'mypy==2.4.1' types-PyYAML \
    && pip wheel --no-cache-dir --wheel-dir /wheels '.[all]' \
    && pip install --no-cache-dir --no-index --find-links /wheels 'podkit[all]' \
    && rm /wheels/podkit-*.whl \
    && PODKIT_COMPILE=1 pip wheel --no-cache-dir --no-deps --no-build-isolation \
       --wheel-dir /wheels .

FROM python:${PYTHON}-slim-bookworm AS podkit
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels 'podkit[all]' \
    && groupadd --gid 10001 podkit \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin podkit
WORKDIR /app
USER 10001:10001
CMD ["podkit", "--help"]

FROM podkit AS examples
COPY --chown=root:root examples/ /app/
