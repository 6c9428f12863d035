FROM scratch
COPY deploy/docker/busybox /bin/busybox
COPY deploy/docker/api-www /www
CMD ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]
