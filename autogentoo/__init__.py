"""autogentoo: Gentoo stage3 tarballs into chroots, initramfs, kernels and images."""

__version__ = "0.1.0"
API_VERSION = "v1"
