#!/bin/sh
# Example worker: would consume a queue; here it only stays alive.
while true; do
  sleep 1
done
