# The pipeline's image: Python, FFCV's system libraries, DVC and every pinned package of
# requirements.lock (the same install as CI's, by the same scripts/setup). The repository is not in
# the image: mount it at /workspace and run `dvc repro`, a stage or the tests there (README: Container).
#
# BASE: any Debian 12 image. The default runs on NVIDIA GPUs under the NVIDIA container toolkit:
# PyTorch's CUDA wheels carry their own CUDA libraries, the toolkit adds the driver.
ARG BASE=docker.io/library/debian:bookworm-slim
FROM ${BASE}

# PIP_CERT: a CA bundle for pip, if a TLS-inspecting proxy stands between you and PyPI.
ARG PIP_CERT
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ make git ca-certificates \
    && rm -rf /var/lib/apt/lists/*

COPY requirements.lock /opt/projector-ib/
COPY scripts/setup /opt/projector-ib/scripts/
RUN VENV=/opt/venv /opt/projector-ib/scripts/setup --deps-only && rm -rf /var/lib/apt/lists/*

# Any --user works: a shared writable HOME (numba's cache, matplotlib's config), a USER name for uids
# without a passwd entry (DVC asks for one), DVC's site cache on the mounted repository, git trusts the
# mounted repository whoever owns it, and `dvc exp run` can commit without a configured identity
# (yours, if set, wins).
RUN mkdir -m 1777 /home/user \
    && git config --system --add safe.directory '*' \
    && git config --system user.name 'projector-ib container' \
    && git config --system user.email 'container@localhost'
ENV PATH=/opt/venv/bin:$PATH HOME=/home/user USER=user NUMBA_CACHE_DIR=/home/user/.cache/numba \
    DVC_SITE_CACHE_DIR=/workspace/.dvc/tmp/site-cache DVC_NO_ANALYTICS=1
WORKDIR /workspace
CMD ["python", "-m", "stages", "--help"]
