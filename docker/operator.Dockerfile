# The operator image: grokserve[operator] only (kopf, kubernetes, prometheus-client) - no torch, no ray.
# Build from the repository root:  docker build -f docker/operator.Dockerfile -t grokserve-operator .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY grokserve grokserve
COPY model model
COPY serving serving
COPY operator operator
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[operator]"

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels "grokserve[operator]" \
    && rm -rf /wheels
# Bytecode is compiled at install time; the root filesystem can be read-only at run time.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["grokserve"]
CMD ["operator"]
