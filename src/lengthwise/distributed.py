"""Ray, where it is asked for: whether it is installed, and one way to connect to it (the LongRoPE search's
fitness evaluations and the tasks' cells both run on it). Ray is an optional extra (`lengthwise[ray]`)."""

from __future__ import annotations


def ray_available() -> bool:
    try:
        import ray  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def require_ray(option: str = "--ray"):
    """The `ray` module, or an ImportError naming the install command."""
    try:
        import ray  # noqa: PLC0415
    except ImportError as err:
        raise ImportError(f"{option} needs Ray: pip install 'lengthwise[ray]' (or run without it: the serial "
                          "path gives the same results)") from err
    return ray


def start_ray(address: str, cpus: float, option: str = "--ray") -> bool:
    """Connect to (or, for "local", start with `cpus` CPUs) Ray unless this process already is; True when this call
    started it (the caller then shuts it down)."""
    ray = require_ray(option)
    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": False, "log_to_driver": False}
    if address == "local":
        ray.init(num_cpus=cpus, **kwargs)
    else:
        ray.init(address=address, **kwargs)
    return True
