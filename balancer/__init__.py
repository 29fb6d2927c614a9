"""The balancer app: node registry and health, user pinning, proxying, async tasks and /multi_demo/."""
