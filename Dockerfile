# syntax=docker/dockerfile:1
# wsnic in a container, with the original wsnic's conventions:
#   /opt/wsnic/wsnic.conf, /opt/wsnic/cert/cert.crt, /opt/wsnic/cert/cert.key, address 0.0.0.0.
# Run with --cap-add=NET_ADMIN --device /dev/net/tun:/dev/net/tun (see README, "Docker").
FROM debian:12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv iproute2 nftables libnftables1 iptables dnsmasq-base iperf procps \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md /usr/src/wsnic/
COPY wsnic /usr/src/wsnic/wsnic
COPY profiles /usr/src/wsnic/profiles
RUN python3 -m venv /opt/wsnic/venv \
    && /opt/wsnic/venv/bin/pip install --no-cache-dir /usr/src/wsnic

# The working directory is where the original looked for wsnic.conf and cert/ under Docker.
WORKDIR /opt/wsnic
EXPOSE 8086 8087
ENTRYPOINT ["/opt/wsnic/venv/bin/wsnic"]
