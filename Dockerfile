# The microseg agent's image. Its only build step is scripts/setup.sh, the script `make setup`
# runs on a machine (tests/test_compose.py checks that), with SETUP_IMAGE=1 leaving out what an
# image does not need (Java and Kafka's jars, kernel headers: the host's are mounted at run
# time, browser test tools) and SETUP_SKIP_MOUNT=1 (a build cannot mount bpffs).
#
# Run it privileged on the host's network with /sys/fs/bpf, /lib/modules and /usr/src mounted:
# see docker-compose.yml. The default command is the `make run` demo.
FROM debian:12

WORKDIR /opt/microseg
COPY . .
ENV SETUP_IMAGE=1
RUN SETUP_SKIP_MOUNT=1 scripts/setup.sh && rm -rf /var/lib/apt/lists/*

CMD ["make", "run"]
