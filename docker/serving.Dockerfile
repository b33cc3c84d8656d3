# The serving image that KubeRay runs as Ray head and workers: Ray (matching spec.ray.rayVersion)
# plus grokserve[serve] (torch, the model, the Ray Serve app).
# Build from the repository root:  docker build -f docker/serving.Dockerfile -t grokserve-serving .
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}
WORKDIR /home/ray/grokserve
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users grokserve grokserve
COPY --chown=ray:users model model
COPY --chown=ray:users serving serving
COPY --chown=ray:users operator operator
# ray is already in the base image at the right version; keep it, add the rest of [serve].
RUN pip install --no-cache-dir ".[serve]" "ray[serve]==$(python -c 'import ray; print(ray.__version__)')"
ENV PYTHONUNBUFFERED=1
