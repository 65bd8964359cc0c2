# A local stand-in for the prom/prometheus image, for `make container-test` where no registry can
# be reached: Debian's prometheus package on the local base image, started the way the official
# image starts (entrypoint /bin/prometheus, user nobody, data in /prometheus, port 9090).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o nobody -g nogroup /prometheus \
    && /bin/prometheus --version
USER 65534:65534
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
