"""agctl: the unprivileged client."""
