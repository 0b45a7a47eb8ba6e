# moshi-webrtc on a CUDA host. Build: docker build -t moshi-webrtc .
# Run:   docker run --gpus all --network host -v ~/.cache/huggingface:/root/.cache/huggingface moshi-webrtc
#
# WebRTC media is UDP. aiortc picks a random ephemeral UDP port per call and has no port-range
# option, so publishing a fixed list of ports (-p) does not work: use --network host, or put a
# TURN server in front (see the README) so callers only need to reach the TURN ports.
# The HTTP port (8080/tcp) serves the page and the offer/answer API; browsers need https or
# localhost for the microphone, so terminate TLS in front of it for remote callers.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY signaling ./signaling
COPY web ./web
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --upgrade pip && /opt/venv/bin/pip install .
ENV PATH=/opt/venv/bin:$PATH MOSHI_WEBRTC_WEB_DIR=/app/web

EXPOSE 8080/tcp
# Alive = the process can still use its GPU. After a CUDA error /healthz answers 503 and the server
# exits with status 70 on its own; either way the container's restart policy brings it back.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10m --retries=3 \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"
# --model auto serves kyutai/moshiko-pytorch-bf16 when a GPU is visible (weights come from the
# Hugging Face cache or hub), and the tiny test model, loudly labelled, when none is.
ENTRYPOINT ["moshi-webrtc", "serve", "--host", "0.0.0.0", "--port", "8080"]
CMD ["--model", "auto"]
