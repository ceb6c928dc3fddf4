"""The autogentoo daemon: everything that runs as root."""
