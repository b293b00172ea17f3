# shepherd-runner: the Shepherd task runner with the Claude Code CLI and the
# tools the agent works with.  Build: `make image` (buildah, local base) or any
# Dockerfile builder (`docker buildx build .`, release workflow).
#
# Stages: `claude` fetches the pinned Claude Code CLI with npm and keeps only
# its native binary; `venv` installs the runner into a virtualenv; `portable`
# freezes it into /opt/shepherd-runner for images without Python; the final
# stage has neither Node.js nor a C compiler nor build caches; it has Go.

# The one pin of the Claude Code CLI: the Makefile and deploy/image.mk read it
# from this line, tests/test_pins.py checks every other mention against it.
ARG CLAUDE_CODE_VERSION=2.1.332

# --- Claude Code CLI ----------------------------------------------------------
# Debian bookworm's nodejs (18.19) and npm (9.2) install the package fine: its
# engines field asks for node >= 18, and the postinstall script only links the
# platform binary. npm's Debian package drags node-gyp and a toolchain in, but
# only into this throw-away stage.
FROM debian:bookworm-slim AS claude
ARG CLAUDE_CODE_VERSION
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Debian's archive pins the package versions of a release; no further pins.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates nodejs npm \
    && rm -rf /var/lib/apt/lists/*
# Node ships its own CA list: trust the system's (a TLS-intercepting proxy's CA
# may be in there on a build machine).
ENV NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt \
    npm_config_update_notifier=false
WORKDIR /build
# The CLI's native binary comes as the optional dependency
# @anthropic-ai/claude-code-linux-x64 (glibc); bin/claude.exe of the main
# package is a hard link to it after postinstall. Keep that file only.
RUN npm install --no-audit --no-fund --loglevel=error \
        "@anthropic-ai/claude-code@${CLAUDE_CODE_VERSION}" \
    && install -D -m 0755 node_modules/@anthropic-ai/claude-code-linux-x64/claude /out/claude \
    && HOME=/tmp /out/claude --version | grep -F "${CLAUDE_CODE_VERSION}" \
    && rm -rf /build/node_modules /root/.npm /tmp/*

# --- the runner's virtualenv ---------------------------------------------------
FROM debian:bookworm-slim AS venv
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
RUN python3 -m venv /opt/shepherd/venv
WORKDIR /src
# README* so that a tree without README.md still builds (setup.cfg reads it
# for long_description; setuptools skips a missing file).
COPY setup.cfg pyproject.toml README* shepherd_runner.py hook.py ./
# The runner's one dependency (requests) comes with it. pip and setuptools are
# then removed from the runner's venv: the agent has Debian's pip and venv, and
# the runner's environment stays as built.
RUN /opt/shepherd/venv/bin/pip install /src \
    && /opt/shepherd/venv/bin/pip uninstall -y -q setuptools pip \
    && /opt/shepherd/venv/bin/python -c 'import shepherd_runner, hook, requests'

# --- the portable runner --------------------------------------------------------
# The runner, requests and the interpreter frozen into one directory by
# PyInstaller (deploy/portable.spec), for images without Python: README, "Bring
# your own image". Built on bookworm whatever the final stage's base: the
# directory runs with any glibc at least as new as the one it was built with
# (2.36). libpython3.11 is the shared interpreter that it bundles; binutils
# strips the binaries.
FROM debian:bookworm-slim AS portable
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        binutils ca-certificates libpython3.11 python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
COPY deploy/portable-requirements.txt /build/
RUN python3 -m venv /build/venv \
    && /build/venv/bin/pip install -r /build/portable-requirements.txt
WORKDIR /src
COPY setup.cfg pyproject.toml README* shepherd_runner.py hook.py ./
COPY deploy/portable.spec deploy/portable_main.py deploy/
# requests as the venv stage gets it; then /opt/shepherd-runner/, at most 30 MB.
RUN /build/venv/bin/pip install /src \
    && /build/venv/bin/pyinstaller --noconfirm --log-level WARN \
        --distpath /opt --workpath /build/work deploy/portable.spec \
    && /opt/shepherd-runner/shepherd-runner --version \
    && du -sh /opt/shepherd-runner \
    && test "$(du -sm /opt/shepherd-runner | cut -f1)" -le 30

# --- final image ---------------------------------------------------------------
FROM debian:bookworm-slim
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The agent's tools, and tini as PID 1 (see ENTRYPOINT).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates curl gh git jq make openssh-client \
        python3 python3-pip python3-venv ripgrep tini \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt/* /var/log/dpkg.log

# Go 1.23 from bookworm-backports (bookworm itself has 1.19), from the mirror the
# base's own sources name. Backports have apt priority 100: only what is asked
# for by name comes from there, nothing else is upgraded. Debian's go.env keeps
# Go's default GOTOOLCHAIN=auto: a go.mod that asks for a newer Go gets it from
# the module proxy at run time. There is no C compiler, so cgo is off (Go turns
# it off when it finds no gcc). dpkg leaves out what go build, test and install
# never read: Go's own tests, the sources of its prebuilt tools, and the
# profile viewers (deploy/go-slim.dpkg.cfg says what and why).
COPY deploy/go-slim.dpkg.cfg /etc/dpkg/dpkg.cfg.d/go-slim
# hadolint ignore=DL3008
RUN mirror="$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources | head -n 1)" \
    && printf '%s\n' 'Types: deb' "URIs: ${mirror:-http://deb.debian.org/debian}" \
        'Suites: bookworm-backports' 'Components: main' \
        'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
        >/etc/apt/sources.list.d/bookworm-backports.sources \
    && apt-get update \
    && apt-get install -y --no-install-recommends golang-1.23-go \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt/* /var/log/dpkg.log \
    && /usr/lib/go-1.23/bin/go version

RUN groupadd --gid 1000 shepherd \
    && useradd --uid 1000 --gid 1000 --home-dir /home/shepherd --create-home \
        --shell /bin/bash shepherd \
    && install -d -o 1000 -g 1000 -m 0755 /workspace

COPY --from=claude /out/claude /usr/local/bin/claude
COPY --from=venv /opt/shepherd/venv /opt/shepherd/venv
COPY --from=portable /opt/shepherd-runner /opt/shepherd-runner
# Baked under /etc/shepherd: $HOME is an emptyDir at run time, so the runner
# copies these into ~/.claude/ when it starts.
COPY settings.json CLAUDE.md /etc/shepherd/

# ~/.local/bin (pip install --user) and $GOPATH/bin (go install) are on PATH,
# created under the emptyDir HOME when first used. They come after the system's
# here, for the runner itself: a `git` the agent drops there must not run the
# runner's pushes. The runner puts them first for setup and the agent. The
# venv comes last: `python` is the venv's (the only `python`; the staged Stop
# hook runs it by its path), python3 and pip are Debian's, so what pip
# installs with --user is importable.
# PEP 668: uid 1000 cannot write the system site-packages at all, so letting
# pip past Debian's EXTERNALLY-MANAGED marker only opens the user site
# (pip install defaults to --user there).
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/go-1.23/bin:/home/shepherd/.local/bin:/home/shepherd/go/bin:/opt/shepherd/venv/bin \
    HOME=/home/shepherd \
    GOPATH=/home/shepherd/go \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    SHEPHERD_CONFIG_DIR=/etc/shepherd \
    SHEPHERD_WORK_DIR=/workspace \
    DISABLE_AUTOUPDATER=1

WORKDIR /workspace
EXPOSE 8888
USER 1000:1000

# Labels last: the version and revision change with every commit and would
# otherwise invalidate the cached layers above.
ARG VERSION=0.1.0
ARG REVISION=unknown
# the repository URL; `make image` and the release workflow pass it
ARG SOURCE=""
LABEL org.opencontainers.image.title="shepherd-runner" \
      org.opencontainers.image.description="Runs one Shepherd coding task with the Claude Code CLI and reports the outcome" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="debian:bookworm-slim"

# PID 1 is tini, the runner its child. The agent's commands outlive their
# parents (each Bash command runs in a session of its own) and are re-parented
# to PID 1, which must reap them. The runner does not: a waitpid(-1) reaper
# would steal the exit statuses of its own git and agent subprocesses. tini
# reaps them and forwards SIGTERM to the runner, which stops every process of
# the task (found by a marker in their environment) and reports; the
# container's exit code is the runner's.
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/shepherd/venv/bin/shepherd-runner"]
CMD ["serve"]
