# moshi-webrtc on a CUDA host. Build: docker build -t moshi-webrtc .
# Run:   docker run --gpus all --network host -v ~/.cache/huggingface:/home/moshi/.cache/huggingface moshi-webrtc
#
# WebRTC media is UDP. aiortc picks a random ephemeral UDP port per call and has no port-range
# option, so publishing a fixed list of ports (-p) does not work: use --network host, or put a
# TURN server in front (see the README) so callers only need to reach the TURN ports.
# The HTTP port (8080/tcp) serves the page and the offer/answer API; browsers need https or
# localhost for the microphone, so terminate TLS in front of it for remote callers.
#
# Python: Ubuntu 24.04's python3 is 3.12, inside pyproject.toml's requires-python (3.11-3.13: aiortc 1.16
# and av 18 need 3.11). torch 2.9.1's Linux wheel from PyPI is built for CUDA 12.8 and brings its own
# CUDA and cuDNN libraries as pip packages; the image needs only the driver, which --gpus passes in.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY signaling ./signaling
COPY web ./web
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --upgrade pip && /opt/venv/bin/pip install .
ENV PATH=/opt/venv/bin:$PATH MOSHI_WEBRTC_WEB_DIR=/app/web

# The server runs as an unprivileged user; the code and the venv stay root's, read-only to it. Its uid
# (1000 unless built with --build-arg UID=...) should own the Hugging Face cache mounted into its home.
# Ubuntu's images ship a user "ubuntu" with uid 1000: it makes way for ours. The cache folders exist in
# the image, so a volume mounted on one does not leave ~/.cache to root (voices unpack to ~/.cache too).
ARG UID=1000
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --create-home --uid "$UID" --shell /usr/sbin/nologin moshi \
    && install -d -o moshi -g moshi /home/moshi/.cache /home/moshi/.cache/huggingface
USER moshi
ENV HOME=/home/moshi

EXPOSE 8080/tcp
# Alive = the process can still use its GPU. After a CUDA error /healthz answers 503 and the server
# exits with status 70 on its own; either way the container's restart policy brings it back.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10m --retries=3 \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"
# --model auto serves kyutai/moshiko-pytorch-bf16 when a GPU is visible (weights come from the
# Hugging Face cache or hub), and the tiny test model, loudly labelled, when none is.
ENTRYPOINT ["moshi-webrtc", "serve", "--host", "0.0.0.0", "--port", "8080"]
CMD ["--model", "auto"]
