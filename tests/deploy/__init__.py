"""deploy/: the compose and Kubernetes files parse and agree with the server (ports,
probes, images, GPU requests), the mosquitto ACL does what it says on a real broker, the
Dockerfiles point at the entrypoint, and the entrypoint works as a plain command."""
