"""Emulators edgepack sets up by itself, on first use, in the user's cache (layer 1, beside
runtimes/): nothing is installed system-wide and nothing needs root.

    debian.py    fetch Debian packages privately: signed index, checksums, selected files only
    vulkan.py    ask the Vulkan loader which driver a process gets, and what it supports
    lavapipe.py  Mesa's lavapipe (a conformant Vulkan driver running on the CPU), fetched with
                 debian.py, so LiteRT's GPU accelerator runs on a host without a GPU
"""
