"""Which Vulkan driver does this process get, and can LiteRT's WebGPU accelerator use it?

    probe()  ->  {"ok": True, "devices": [{"name": "llvmpipe (LLVM 15.0.6, 256 bits)", "type": "cpu",
                  "driver_name": "llvmpipe", "driver_info": "Mesa 25.0.7-2~bpo12+1 (LLVM 15.0.6)",
                  "api_version": "1.4.305", "shader_float16": True, "missing_for_webgpu": []}]}

Asks the Vulkan loader (libvulkan.so.1, found the way Dawn finds it: LD_LIBRARY_PATH, then the
system) through ctypes; no vulkaninfo needed. The driver is the one VK_ICD_FILENAMES /
VK_DRIVER_FILES select, so run it in the environment the GPU runner gets (``python -m
edgepack.emulators.vulkan`` prints the JSON). Dawn (the WebGPU implementation inside LiteRT's
GPU accelerator) refuses a device without the dynamic-indexing features below and says only "No
adapters found": Debian 12's own lavapipe (Mesa 22.3.6) lacks the two texel-buffer ones, Mesa
25.0.7 has them all (measured on this project's build host).
"""

from __future__ import annotations

import ctypes
import json
import sys

_U32, _PTR = ctypes.c_uint32, ctypes.c_void_p
# VkStructureType values (Vulkan 1.2 core)
_APPLICATION_INFO, _INSTANCE_CREATE_INFO = 0, 1
_FEATURES_2, _PROPERTIES_2 = 1000059000, 1000059001
_FLOAT16_INT8_FEATURES, _DRIVER_PROPERTIES, _DESCRIPTOR_INDEXING_FEATURES = 1000082000, 1000196000, 1000161001
_DEVICE_TYPES = {0: "other", 1: "integrated-gpu", 2: "discrete-gpu", 3: "virtual-gpu", 4: "cpu"}
# VkPhysicalDeviceFeatures field index, VkPhysicalDeviceDescriptorIndexingFeatures field index
_CORE_FEATURES = {"shaderUniformBufferArrayDynamicIndexing": 33, "shaderStorageBufferArrayDynamicIndexing": 35}
_INDEXING_FEATURES = {"shaderUniformTexelBufferArrayDynamicIndexing": 1, "shaderStorageTexelBufferArrayDynamicIndexing": 2}


class _ApplicationInfo(ctypes.Structure):
    _fields_ = [("sType", _U32), ("pNext", _PTR), ("pApplicationName", ctypes.c_char_p),
                ("applicationVersion", _U32), ("pEngineName", ctypes.c_char_p), ("engineVersion", _U32),
                ("apiVersion", _U32)]


class _InstanceCreateInfo(ctypes.Structure):
    _fields_ = [("sType", _U32), ("pNext", _PTR), ("flags", _U32), ("pApplicationInfo", ctypes.POINTER(_ApplicationInfo)),
                ("enabledLayerCount", _U32), ("ppEnabledLayerNames", _PTR),
                ("enabledExtensionCount", _U32), ("ppEnabledExtensionNames", _PTR)]


class _DriverProperties(ctypes.Structure):
    _fields_ = [("sType", _U32), ("pNext", _PTR), ("driverID", _U32), ("driverName", ctypes.c_char * 256),
                ("driverInfo", ctypes.c_char * 256), ("conformanceVersion", ctypes.c_uint8 * 4)]


class _Properties2(ctypes.Structure):
    # VkPhysicalDeviceProperties's head; "rest" covers its limits and sparse properties (< 1 kB) with room
    _fields_ = [("sType", _U32), ("pNext", _PTR), ("apiVersion", _U32), ("driverVersion", _U32), ("vendorID", _U32),
                ("deviceID", _U32), ("deviceType", _U32), ("deviceName", ctypes.c_char * 256),
                ("rest", ctypes.c_uint8 * 2048)]


class _IndexingFeatures(ctypes.Structure):
    _fields_ = [("sType", _U32), ("pNext", _PTR), ("flags", _U32 * 20)]


class _Float16Int8Features(ctypes.Structure):
    _fields_ = [("sType", _U32), ("pNext", _PTR), ("shaderFloat16", _U32), ("shaderInt8", _U32)]


class _Features2(ctypes.Structure):
    _fields_ = [("sType", _U32), ("pNext", _PTR), ("flags", _U32 * 55)]


def _version(packed: int) -> str:
    return f"{packed >> 22}.{(packed >> 12) & 0x3FF}.{packed & 0xFFF}"


def _describe(vk, device: int) -> dict:
    driver = _DriverProperties(_DRIVER_PROPERTIES, None)
    properties = _Properties2(_PROPERTIES_2, ctypes.cast(ctypes.pointer(driver), _PTR))
    vk.vkGetPhysicalDeviceProperties2(device, ctypes.byref(properties))
    float16 = _Float16Int8Features(_FLOAT16_INT8_FEATURES, None)
    indexing = _IndexingFeatures(_DESCRIPTOR_INDEXING_FEATURES, ctypes.cast(ctypes.pointer(float16), _PTR))
    features = _Features2(_FEATURES_2, ctypes.cast(ctypes.pointer(indexing), _PTR))
    vk.vkGetPhysicalDeviceFeatures2(device, ctypes.byref(features))
    missing = [name for name, index in _CORE_FEATURES.items() if not features.flags[index]]
    missing += [name for name, index in _INDEXING_FEATURES.items() if not indexing.flags[index]]
    return {"name": properties.deviceName.decode(errors="replace"),
            "type": _DEVICE_TYPES.get(properties.deviceType, str(properties.deviceType)),
            "driver_name": driver.driverName.decode(errors="replace"),
            "driver_info": driver.driverInfo.decode(errors="replace"),
            "api_version": _version(properties.apiVersion), "shader_float16": bool(float16.shaderFloat16),
            "missing_for_webgpu": missing}


def probe(loader: str = "libvulkan.so.1") -> dict:
    """The Vulkan devices this process sees ({"ok": False, "error": ...} when none is usable)."""
    try:
        vk = ctypes.CDLL(loader)
    except OSError as exc:
        return {"ok": False, "error": f"no Vulkan loader ({exc})", "devices": []}
    vk.vkCreateInstance.argtypes = [ctypes.POINTER(_InstanceCreateInfo), _PTR, ctypes.POINTER(_PTR)]
    vk.vkEnumeratePhysicalDevices.argtypes = [_PTR, ctypes.POINTER(_U32), _PTR]
    vk.vkGetPhysicalDeviceProperties2.argtypes = [_PTR, _PTR]
    vk.vkGetPhysicalDeviceFeatures2.argtypes = [_PTR, _PTR]
    vk.vkDestroyInstance.argtypes = [_PTR, _PTR]
    application = _ApplicationInfo(_APPLICATION_INFO, None, b"edgepack", 1, b"edgepack", 1, (1 << 22) | (1 << 12))
    create = _InstanceCreateInfo(_INSTANCE_CREATE_INFO, None, 0, ctypes.pointer(application), 0, None, 0, None)
    instance = _PTR()
    result = vk.vkCreateInstance(ctypes.byref(create), None, ctypes.byref(instance))
    if result != 0:  # VK_ERROR_INCOMPATIBLE_DRIVER (-9): the loader found no driver
        return {"ok": False, "error": f"vkCreateInstance failed (VkResult {result}): no Vulkan driver found",
                "devices": []}
    try:
        count = _U32(0)
        vk.vkEnumeratePhysicalDevices(instance, ctypes.byref(count), None)
        handles = (_PTR * count.value)()
        vk.vkEnumeratePhysicalDevices(instance, ctypes.byref(count), handles)
        devices = [_describe(vk, handle) for handle in handles[: count.value]]
    finally:
        vk.vkDestroyInstance(instance, None)
    usable = [d for d in devices if not d["missing_for_webgpu"]]
    error = None
    if not devices:
        error = "the Vulkan driver reports no device"
    elif not usable:
        error = (f"{devices[0]['name']} ({devices[0]['driver_info']}) lacks what WebGPU needs: "
                 f"{', '.join(devices[0]['missing_for_webgpu'])}")
    return {"ok": bool(usable), "error": error, "devices": devices}


if __name__ == "__main__":
    report = probe()
    print(json.dumps(report, indent=1))
    sys.exit(0 if report["ok"] else 1)
