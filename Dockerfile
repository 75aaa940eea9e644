# handoffd: the echo demo by default; any app via a mounted config.
#   docker build -t handoffd .
#   docker run --rm -p 7443:7443 --stop-timeout 40 -v handoffd-keys:/var/lib/handoffd \
#       --security-opt seccomp=docker/seccomp-keyring.json handoffd
# Without the seccomp option Docker's default profile refuses the kernel keyring
# (EPERM) and handoffd runs in its logged fallback key mode. See docs/DEPLOY.md.
#
# The base is named by tag, not pinned by digest: a digest here has to be the
# registry's manifest digest of the image you build on, and none was available when
# this was written (the image is built and tested against a local stand-in made with
# debootstrap + `docker import`, which has no registry digest at all; see
# docs/DOCKER-TEST.md). To pin, on a host that reaches the registry:
#   docker pull python:3.11-slim-bookworm
#   docker image inspect --format '{{index .RepoDigests 0}}' python:3.11-slim-bookworm
# and write what it prints here: FROM python:3.11-slim-bookworm@sha256:<digest>
# (keep the tag in front for readers; Docker uses the digest). docs/DEPLOY.md.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# tini as PID 1: it forwards docker stop's SIGTERM to handoffd's supervisor (which
# drains) and reaps orphaned processes (e.g. what a `docker exec` leaves behind),
# which handoffd's supervisor, waiting only for its own children, does not.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && apt-get clean && rm -rf /var/lib/apt/lists/*

# The container starts as root and keeps only a small supervisor (needs SETUID,
# SETGID and KILL, all in Docker's default capability set); the acceptor, which
# holds the key, runs as this user ([server] user in docker/handoffd.toml) and each
# worker under a bare uid of its own ([workers] uid_range, no passwd entries).
# A fixed, unusual uid: the kernel key quota and user keyring are per uid and NOT
# namespaced, so this uid shares them with any host process of the same uid.
RUN groupadd --system --gid 10443 handoffd \
 && useradd --system --uid 10443 --gid handoffd --home-dir /var/lib/handoffd \
            --shell /usr/sbin/nologin handoffd

WORKDIR /opt/handoffd
COPY pyproject.toml README.md ./
COPY handoffd ./handoffd
RUN pip install . && rm -rf build handoffd.egg-info
COPY examples ./examples
# No private key in the image, ever: .dockerignore keeps *.key (a by-hand
# `handoffd keygen --out examples/echo/server.key`) out of the build context; should
# a key still arrive (another context, an edited .dockerignore), fail the build
# rather than ship it. By name, and by content (a renamed handoffd private key).
RUN keys="$(find /opt/handoffd -name '*.key' -o -name '*.keytab'; \
            grep -rlIE '^handoffd-x25519-private [A-Za-z0-9+/]{43}=?$' /opt/handoffd)"; \
    if [ -n "$keys" ]; then \
        echo "refusing to build: private key(s) in the build context: $keys" >&2; exit 1; \
    fi
COPY docker/handoffd.toml /etc/handoffd/handoffd.toml
COPY docker/entrypoint.py /usr/local/bin/handoffd-entrypoint
# /var/lib/handoffd: the key, the acceptor's alone (the entrypoint generates it as
# handoffd). /run/handoffd: root's; the supervisor binds the control socket there
# (0600 root, for HEALTHCHECK and `docker exec ... handoffd status`).
RUN chmod 0755 /usr/local/bin/handoffd-entrypoint \
 && install -d -o handoffd -g handoffd -m 0700 /var/lib/handoffd \
 && install -d -o root -g root -m 0711 /run/handoffd

# No USER: the supervisor must start as root to run the acceptor and the workers
# under their own uids (docs/DEPLOY.md: --cap-drop ALL --cap-add SETUID
# --cap-add SETGID --cap-add KILL is enough).
VOLUME ["/var/lib/handoffd"]
EXPOSE 7443

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["handoffd", "status", "--control", "/run/handoffd/control.sock"]

# exec form: tini is PID 1 and forwards docker stop's SIGTERM to its one child,
# handoffd's supervisor (the entrypoint execs into `handoffd serve`), which forwards
# it to the acceptor (it drains); tini exits with the supervisor's status.
ENTRYPOINT ["/usr/bin/tini", "--", "handoffd-entrypoint"]
CMD ["serve", "--config", "/etc/handoffd/handoffd.toml"]
