# A Shepherd runner on your own toolchain image (shepherd-runner's README,
# "Bring your own image"). The runner comes from the shepherd-runner image as
# one directory, /opt/shepherd-runner, with its own Python: the base needs
# none, only x86-64 glibc 2.36 or newer (Debian 12, Ubuntu 24.04 and later;
# not Alpine), apt for git and tini, and a shell. Nothing is copied from the
# build context.
#
#   docker build -f byoi.Dockerfile -t my-shepherd-runner .
#   docker build -f byoi.Dockerfile --build-arg BASE=rust:1-slim-bookworm -t ... .
ARG BASE=node:22-slim
# the release image: ghcr.io/<owner of the repository>/shepherd-runner:<version>
ARG RUNNER_IMAGE=ghcr.io/example/shepherd-runner:0.1.0

FROM ${RUNNER_IMAGE} AS shepherd

FROM ${BASE}
USER root
# git for the runner and the agent, tini as PID 1 (it reaps the agent's
# orphaned commands), CA certificates for git and the CLI.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates git tini \
    && rm -rf /var/lib/apt/lists/*
# uid and gid 1000 (node images have them: `node`), with a HOME and /workspace of their own.
RUN if ! getent group 1000 >/dev/null; then groupadd --gid 1000 shepherd; fi \
    && if ! getent passwd 1000 >/dev/null; then \
        useradd --uid 1000 --gid 1000 --no-create-home --home-dir /home/shepherd \
            --shell /bin/sh shepherd; \
    fi \
    && install -d -o 1000 -g 1000 -m 0755 /home/shepherd /workspace

# The runner, the Claude Code CLI's native binary and the runner's settings.json
# (the Stop hook) and CLAUDE.md (the agent's instructions).
COPY --from=shepherd /opt/shepherd-runner /opt/shepherd-runner
COPY --from=shepherd /usr/local/bin/claude /usr/local/bin/claude
COPY --from=shepherd /etc/shepherd /etc/shepherd

ENV HOME=/home/shepherd \
    LANG=C.UTF-8 \
    SHEPHERD_CONFIG_DIR=/etc/shepherd \
    SHEPHERD_WORK_DIR=/workspace \
    DISABLE_AUTOUPDATER=1
WORKDIR /workspace
EXPOSE 8888
USER 1000:1000
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/shepherd-runner/shepherd-runner"]
CMD ["serve"]
