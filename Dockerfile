# CPU image of `idrecog serve`.
#   docker build -t idrecog-serve .
#   docker run -p 8000:8000 -v $PWD/model.ckpt:/models/model.ckpt:ro \
#     -v $PWD/keys.txt:/run/secrets/idrecog_api_keys:ro -v idrecog-audit:/var/lib/idrecog/audit idrecog-serve
# The key file holds hashes only (`idrecog serve-key`); docs/recognition.md, "Serving in production".

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch's CPU wheels (the default ones bring several GB of CUDA libraries), in pyproject.toml's ranges
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.4" "torchvision>=0.19"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY idrecog ./idrecog
COPY lightning_configs/rules ./lightning_configs/rules
# editable: the shipped rule file is found beside the package (idrecog.recognition.rules.default_rules_path)
RUN pip install -e ".[serve]"

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    WANDB_MODE=offline \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
RUN groupadd --system --gid 10001 idrecog \
    && useradd --system --uid 10001 --gid idrecog --no-create-home --shell /usr/sbin/nologin idrecog \
    && mkdir -p /var/lib/idrecog/audit \
    && chown idrecog:idrecog /var/lib/idrecog/audit \
    && chmod 0700 /var/lib/idrecog/audit
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
WORKDIR /app
USER idrecog:idrecog
EXPOSE 8000
# ready = model loaded and warm, not draining (GET /ready needs no key); urlopen raises on a 503
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]
# uvicorn handles SIGTERM (docker stop): no new connections, in-flight requests finish (graceful_timeout)
STOPSIGNAL SIGTERM
ENTRYPOINT ["idrecog", "serve"]
CMD ["--ckpt_path", "/models/model.ckpt", "--host", "0.0.0.0", "--port", "8000", \
     "--api_keys", "/run/secrets/idrecog_api_keys", "--audit.path", "/var/lib/idrecog/audit/decisions.jsonl"]
