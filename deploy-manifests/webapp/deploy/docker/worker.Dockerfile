FROM scratch
COPY deploy/docker/busybox /bin/busybox
CMD ["/bin/busybox", "sh", "-c", "while true; do /bin/busybox sleep 1; done"]
