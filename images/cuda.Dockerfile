# Stage image for stages 3-6 (matting, fitting, meshhead, gaussianhead), in two flavours from this
# one file; build from the repository root with `make images` (CPU) or `make images-cuda` (CUDA).
#   CUDA (defaults; needs a registry): nvidia/cuda bases, a standalone CPython 3.11 (uv), PyTorch
#     from the cu128 index, gsplat compiled ahead of time (no nvcc at run time), face_alignment.
#   CUDA on the project's Debian base (`make images-cuda`; no registry needed, headavatar.devserver.images):
#     BUILD_IMAGE=RUNTIME_IMAGE=headavatar/base, PYTHON_VERSION=system, TORCH_INDEX=PyPI (whose torch 2.11.0
#     is the cu130 build: it carries the CUDA 13 runtime as nvidia-* wheels), CUDA_COMPILER = NVIDIA's
#     compiler wheels of the same CUDA release, the CUDA_HOME that gsplat is compiled with and then removed.
#   CPU (headavatar/cpu; what the demo, the tests and CI run): BUILD_IMAGE=RUNTIME_IMAGE=a Debian
#     Python 3.11 image (public python:3.11 slim, or the project's own headavatar/base), PYTHON_VERSION=system,
#     BUILD_PACKAGES="", WITH_GSPLAT=0 WITH_FAN=0, TORCH_INDEX = the CPU index (or a local wheel index).
# Both flavours: dlib (Boost licence; WITH_DLIB=1), the default landmark detector. Its 68-point model is not in
#   the image (trained on non-commercial data): users put it into the bucket (`headavatar assets put dlib68 FILE`).
# Optional CUDA backends, off by default (build args = 1 to include):
#   WITH_DIFF_GAUSSIAN  diff-gaussian-rasterization built with 32 channels (NON-COMMERCIAL licence)
#   WITH_SIMPLE_KNN     simple-knn (nearest-neighbour scale initialisation)
#   WITH_PYTORCH3D      pytorch3d (BSD)          WITH_KAOLIN  kaolin (Apache-2.0)
# Layers: toolchain, PyTorch and the locked requirements first; the code (every commit) and the
# commit label last, so a code-only change rebuilds two small layers in seconds.
ARG BUILD_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
ARG RUNTIME_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${BUILD_IMAGE} AS deps
ARG PYTHON_VERSION=3.11.11
ARG UV_VERSION=0.9.5
ARG BUILD_PACKAGES="git ca-certificates build-essential python3 python3-venv"
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG WITH_GSPLAT=1
ARG GSPLAT_VERSION=1.5.3
ARG WITH_FAN=1
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
ARG MAX_JOBS=8
ARG CUDA_COMPILER=""
ARG WITH_DIFF_GAUSSIAN=0
ARG DIFF_GAUSSIAN_REPO=https://github.com/graphdeco-inria/diff-gaussian-rasterization.git
ARG WITH_SIMPLE_KNN=0
ARG SIMPLE_KNN_REF=git+https://gitlab.inria.fr/bkerbl/simple-knn.git
ARG WITH_PYTORCH3D=0
ARG PYTORCH3D_REF=git+https://github.com/facebookresearch/pytorch3d.git@9381c4016376345bb795b97c45a6c2de66db354a
ARG WITH_KAOLIN=0
ARG KAOLIN_VERSION=0.18.0
ARG KAOLIN_INDEX=https://nvidia-kaolin.s3.us-east-2.amazonaws.com/torch-2.8.0_cu128.html
ARG WITH_DLIB=1
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} MAX_JOBS=${MAX_JOBS}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN if [ -n "${BUILD_PACKAGES}" ]; then apt-get update \
      && apt-get install -y --no-install-recommends ${BUILD_PACKAGES} && rm -rf /var/lib/apt/lists/*; fi
# CUDA: a standalone CPython (python-build-standalone via uv from PyPI), the same 3.11 as the CPU
# image and CI. CPU: the base image's own Python 3.11 (PYTHON_VERSION=system).
RUN mkdir -p /opt/python && if [ "${PYTHON_VERSION}" = system ]; then python3 -m venv /opt/venv; else \
      python3 -m venv /opt/uv && /opt/uv/bin/pip install "uv==${UV_VERSION}" \
      && /opt/uv/bin/uv python install "${PYTHON_VERSION}" \
      && /opt/uv/bin/uv venv --python "${PYTHON_VERSION}" --seed /opt/venv && rm -rf /opt/uv; fi
# The host's locally added CAs (images/ca/, e.g. a TLS-inspecting proxy's), for pip in this stage only.
COPY images/ca/ /usr/local/share/ca-certificates/
RUN if command -v update-ca-certificates >/dev/null; then update-ca-certificates >/dev/null; fi
ENV PATH=/opt/venv/bin:$PATH PIP_CERT=/etc/ssl/certs/ca-certificates.crt
COPY images/requirements/torch-deps.txt /tmp/torch-deps.txt
# torch's own dependencies pinned from PyPI first, so the torch index only has to serve torch.
RUN pip install --requirement /tmp/torch-deps.txt \
    && pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && python -c "import torch; print('torch', torch.__version__)"
COPY images/requirements/preprocess.txt images/requirements/train.txt /tmp/
RUN pip install --requirement /tmp/preprocess.txt --requirement /tmp/train.txt \
    && python -c "import torch; assert torch.__version__.startswith('${TORCH_VERSION}'), torch.__version__"
# gsplat from its source distribution, so its CUDA kernels are compiled here, once. Without a CUDA
# toolkit in the base, CUDA_COMPILER's wheels (nvcc, its front end and headers, all under
# site-packages/nvidia/cu<major>, beside the runtime torch brought) are the CUDA_HOME, and leave after.
# CUDA_COMPILER's pins are in the build argument; its names are split into words on purpose.
# hadolint ignore=DL3013,SC2046
RUN if [ "${WITH_GSPLAT}" = 1 ]; then \
      if [ -n "${CUDA_COMPILER}" ]; then \
        pip install ${CUDA_COMPILER} \
        && major=$(python -c "import torch; print(torch.version.cuda.split('.')[0])") \
        && CUDA_HOME="$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/nvidia/cu${major}" \
        && export CUDA_HOME PATH="${CUDA_HOME}/bin:${PATH}" \
        && { [ -e "${CUDA_HOME}/lib/libcudart.so" ] || ln -s "libcudart.so.${major}" "${CUDA_HOME}/lib/libcudart.so"; } \
        && nvcc --version | tail -1; fi \
      && pip install ninja==1.13.0 \
      && pip install --no-build-isolation --no-binary gsplat "gsplat==${GSPLAT_VERSION}" \
      && python -c "import importlib.util as u; assert u.find_spec('gsplat.csrc'), 'gsplat kernels not built'" \
      && pip uninstall -y ninja $(echo "${CUDA_COMPILER}" | sed 's/==[^ ]*//g') \
      && python -c "import gsplat.csrc"; fi
# face-alignment asks for opencv-python, whose cv2 needs X11 libraries no stage image has (and replaces the
# locked headless build): it goes, the locked opencv-python-headless comes back, and cv2 must import.
# The reference renders 32 feature channels: the rasteriser's NUM_CHANNELS is a compile-time constant.
# These are the builds measured on CUDA 13 + torch 2.11 (docs/gpu.md, docs/stages/).
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
    && if [ "${WITH_DLIB}" = 1 ]; then pip install dlib-bin==20.0.1.post1; fi \
    && if [ "${WITH_FAN}" = 1 ]; then pip install face-alignment==1.5.0 \
      && pip uninstall -y opencv-python \
      && pip install --force-reinstall --no-deps "$(grep '^opencv-python-headless==' /tmp/preprocess.txt)"; fi \
    && python -c "import cv2; print('cv2', cv2.__version__)"

FROM ${RUNTIME_IMAGE}
ARG FLAVOUR=cuda
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 \
    HEADAVATAR_CONFIG_DIR=/opt/headavatar/config HEADAVATAR_SCRATCH=/scratch \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN groupadd --gid 10001 headavatar && useradd --uid 10001 --gid 10001 --create-home headavatar \
    && mkdir /scratch && chown 10001:10001 /scratch
VOLUME /scratch
COPY --from=deps /opt/python /opt/python
COPY --from=deps /opt/venv /opt/venv
COPY config/ /opt/headavatar/config/
COPY pyproject.toml README.md /opt/headavatar/src/
COPY tasks/ /opt/headavatar/src/tasks/
RUN pip install --no-deps --no-build-isolation --no-compile /opt/headavatar/src \
    && rm -rf /opt/headavatar/src/build && headavatar stages
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="headavatar-${FLAVOUR}" \
      org.opencontainers.image.description="NeRSemble -> Gaussian Head Avatar: stages 3-6 on ${FLAVOUR}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
ENV HEADAVATAR_GIT_COMMIT=${GIT_COMMIT}
USER 10001:10001
WORKDIR /home/headavatar
ENTRYPOINT ["headavatar"]
CMD ["--help"]
