# syntax=docker/dockerfile:1
# The podkit image: `podkit` and every backend driver, non-root, for a read-only root
# filesystem. Targets:
#   podkit    (default) runs podkit's components:  docker build -t REGISTRY/podkit:VERSION .
#   examples  adds examples/ under /app, the image `podkit k8s --image` names for the
#             example specs:  docker build --target examples -t REGISTRY/podkit-examples:VERSION .
ARG PYTHON=3.11

FROM python:${PYTHON}-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# wheels for podkit and every dependency, so the final stage needs no compiler and no cache
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[all]'

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
