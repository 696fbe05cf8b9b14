# One image for every HydraServe service; docker-compose.yml picks the command.
#   docker build -t hydraserve .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# torch first, in its own layer: it is by far the largest and changes least often.
# (PyPI's CPU-only index is not reachable from every build host; this is PyPI's default build.)
RUN pip install torch==2.13.0

COPY pyproject.toml README.md ./
COPY libs ./libs
COPY services ./services
COPY hydraserve ./hydraserve
RUN pip install . \
    && useradd --create-home --uid 1000 hydraserve \
    && mkdir -p /store /work \
    && chown hydraserve /store /work

USER hydraserve
# `python -m services.<name>` resolves against /app; the `hydraserve` CLI is installed too.
CMD ["hydraserve", "--help"]
