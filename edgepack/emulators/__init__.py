"""Emulators edgepack sets up by itself, on first use, in the user's cache (layer 1, beside
runtimes/): nothing is installed system-wide and nothing needs root.

    debian.py    fetch Debian packages privately: signed index, checksums, selected files only
    vulkan.py    ask the Vulkan loader which driver a process gets, and what it supports
    lavapipe.py  Mesa's lavapipe (a conformant Vulkan driver running on the CPU), fetched with
                 debian.py, so LiteRT's GPU accelerator runs on a host without a GPU
    qemu.py      qemu-aarch64 10.x user mode (bookworm-backports): arm64 programs per CPU model
    arm64_python.py  an arm64 python3.11 sysroot (Debian) + aarch64 wheels of the runtimes, run
                 under qemu: the device kit on arm64 kernels
    qemu_counting.py  a plugin-enabled qemu-aarch64 built from Debian's source (opt-in) and the
                 plugin that counts executed instructions; guest_count.py is what it counts
"""
